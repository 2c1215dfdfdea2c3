"""Pruner: the user-facing object of stage 1 (docs/METHOD.md, "Stage 1") - masks on a model, scores, global pruning.

Stage of the flow: model -> adapter (sites) -> **Pruner** owns a ScoreArena with one mask per site
side -> masked_linear writes mask gradients into it -> ``step()`` at macro-batch boundaries runs the
arena step (score, EMA, global threshold, prune) -> ``repack()`` hands masks to repack.repack_model.

    pruner = tsprune.Pruner(model, criterion="taylor", ema=0.5, prune_ratio_per_epoch=0.3,
                            macro_batch_size=256, samples_per_epoch=len(train_windows))
    pruner.attach()
    for ctx, tgt in batches:
        adapter.loss(model, ctx, tgt).backward()
        pruner.step(len(ctx))          # prunes when a macro-batch is complete
    small = pruner.repack()
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

import tsprune_kernels as K

from .adapters import get_adapter
from .adapters.base import Adapter, Point, Site
from .criteria import Criterion, criterion_names, get_criterion
from .masking import MaskBinding, attach, attach_point, detach_masks
from .repack import gather_planned, load_exact, repack_model

#: the built-in criteria's names (criterion_names() also lists those registered later)
CRITERIA = criterion_names()

#: the one step-result type (tsprune_kernels.StepResult): macro_step, pruned, live, total, capped,
#: live_before, k
StepInfo = K.StepResult


class Pruner:
    """Masks, scores and global pruning for one model.

    criterion: a registered name - taylor (-g*m), taylor2 (-(sum_i g_i) + 0.5 sum_i g_i**2), fisher
               (sum_i g_i**2), magnitude (weight row/column norms), wanda (||X_j|| * ||W_:,j||; input
               units only, output units fall back to magnitude) - or a ``tsprune.criteria.Criterion``.
               Its ``stats`` decide what the arena holds and what the masked model collects; the
               Pruner never looks at its name. ``pruner.criterion`` is the Criterion object.
    ema:       smoothing of the importance across macro-steps (docs/METHOD.md, "Stage 1").
    block:     channels per FFN / residual unit; heads: attention units are whole heads.
    prune_ratio_per_epoch, samples_per_epoch, macro_batch_size: the geometric schedule, each macro
               step prunes ceil(r * live) with r = prune_ratio_per_epoch / macro_steps_per_epoch.
    max_prune_ratio: stop ranking once this fraction of all units is pruned (then ``done`` is True).
               Units whose importance is exactly 0 (they change nothing the loss sees, e.g. dead
               ReLU channels) are removed at every step whatever the cap and the ratio (docs/METHOD.md, "Stage 1"),
               so the pruned fraction can end above the cap, and ratio 0 can still prune.
    residual:  False (default): the residual stream is not pruned. True / "shared": ONE mask
               ``masks["residual"]`` (d_model / block units) on the stream, shared by every place
               it acts (where it enters the blocks, q/k/v/up inputs, o/down outputs, output heads),
               scored with the sum of those gradients and removed physically by repack (norms
               rescaled exactly; refused with the reason for families where it cannot be exact).
               "paper": the paper's independent per-Linear residual masks, whose zeros stay as zero
               weights after repack (no saving; for reproducing the paper).
    layers:    one gate unit per sub-block (every attention and FFN), mask ``<sub-block path>.gate``;
               a gated-off sub-block adds exactly zero to the stream and repack removes all its
               weights. Residual and gate units remove many parameters each: their score is divided
               by the parameters one unit removes, relative to the average inner unit
               (``pruner.unit_scale``; docs/METHOD.md "Residual width and sub-blocks"). Both need a
               criterion reading only gradients (taylor); compaction shrinks the stream and drops
               gated-off sub-blocks too.
    distributed: data-parallel calibration (tsprune.distributed): each macro-step all-reduces the
               flat accumulators once before scoring and takes rank 0's masks after pruning. None
               (default): on when a torch.distributed process group with > 1 rank is initialised.
               Then ``step(n)`` takes the GLOBAL micro-batch size (all ranks together).
    compact:   shrink the model IN PLACE to its live units after every macro-step that pruned, so
               pruned heads, head dims and channels cost nothing in later forwards and backwards
               (see :meth:`compact_`). None (default): off for hand-written loops, switched on by
               ``tsprune.train.calibrate`` (and so the CLI); True / False force it. Compaction
               assumes frozen weights (stage 1): the live model is rebuilt from a host copy of the
               weights taken when compaction starts, and its parameters are frozen.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: "str | Criterion" = "taylor",
        ema: float = 0.5,
        block: int = 1,
        heads: bool = False,
        prune_ratio_per_epoch: float = 0.3,
        macro_batch_size: int = 8192,
        samples_per_epoch: int | None = None,
        max_prune_ratio: float = 0.9,
        residual: bool | str = False,
        adapter: Adapter | None = None,
        distributed: bool | None = None,
        compact: bool | None = None,
        layers: bool = False,
    ):
        criterion = get_criterion(criterion, "Pruner")
        modes = {False: None, None: None, True: "shared", "shared": "shared", "paper": "paper"}
        if not isinstance(residual, (bool, str, type(None))) or residual not in modes:
            raise ValueError(f"Pruner: residual must be False, True, 'shared' or 'paper', got {residual!r}")
        mode = modes[residual]
        if not 0.0 <= ema <= 1.0:
            raise ValueError(f"Pruner: ema must be in [0, 1], got {ema}")
        if not 0.0 <= prune_ratio_per_epoch <= 1.0:
            raise ValueError(f"Pruner: prune_ratio_per_epoch must be in [0, 1], got {prune_ratio_per_epoch}")
        if not 0.0 <= max_prune_ratio < 1.0:
            raise ValueError(f"Pruner: max_prune_ratio must be in [0, 1), got {max_prune_ratio}")
        if macro_batch_size < 1:
            raise ValueError(f"Pruner: macro_batch_size must be >= 1, got {macro_batch_size}")
        self.model = model
        self.adapter = adapter or get_adapter(model, block=block, heads=heads)
        sites = self.adapter.sites(model)
        if mode is None:
            sites = [
                dataclasses.replace(
                    s,
                    mask_in=None if s.residual_in else s.mask_in,
                    mask_out=None if s.residual_out else s.mask_out,
                )
                for s in sites
            ]
            sites = [s for s in sites if s.mask_in is not None or s.mask_out is not None]
        elif mode == "shared":  # every stream side reads the one "residual" mask
            sites = [dataclasses.replace(s, name_in="residual" if s.residual_in else None,
                                         name_out="residual" if s.residual_out else None) for s in sites]
        points: list[Point] = []
        if mode == "shared" or layers:
            extra, points = self.adapter.extra_units(model, residual=mode == "shared", layers=bool(layers))
            sites = sites + extra
            if criterion.stats != ("grad",):
                raise ValueError(
                    f"Pruner: criterion {criterion.name!r} reads {', '.join(criterion.stats)}; residual=True and "
                    "layers=True support criteria reading only 'grad' (taylor): a shared mask's per-sample squares "
                    "and weight norms would be per place, not of the whole unit"
                )
        self.sites: list[Site] = sites
        self.points: list[Point] = points
        self.residual = mode or False
        self.layers = bool(layers)
        self.criterion = criterion
        self.ema = ema
        self.prune_ratio_per_epoch = prune_ratio_per_epoch
        self.macro_batch_size = macro_batch_size
        self.samples_per_epoch = samples_per_epoch
        self.max_prune_ratio = max_prune_ratio
        device = next(model.parameters()).device
        specs: dict[str, tuple[int, int]] = {}
        units = [(s.mask_name(side), spec.units, spec.block) for s in self.sites
                 for side, spec in (("in", s.mask_in), ("out", s.mask_out)) if spec is not None]
        for name, u, b in units + [(pt.name, pt.units, pt.block) for pt in points]:
            if specs.setdefault(name, (u, b)) != (u, b):  # a shared mask must mean the same everywhere
                raise ValueError(f"Pruner: mask {name!r} is {specs[name]} units x block in one place, {(u, b)} in another")
        self.arena = K.ScoreArena(specs, device=device, stats=criterion.stats)
        self.unit_scale: torch.Tensor | None = None  # [U] score multiplier (None: all 1)
        if points or mode == "shared":
            self.unit_scale = self._unit_scale(device)
        from . import distributed as D

        self.comm = D.ArenaSync() if (D.is_dist() if distributed is None else distributed) else None
        self._seen = 0
        self.macro_steps = 0
        self.done = False
        self.history: list[StepInfo] = []
        self.compact = compact
        self._orig: nn.Module | None = None  # host copy of the uncompacted model (compaction only)
        self._phys: _Physical | None = None  # the compacted model's mask buffers and their map
        self._attached = False
        if compact:
            self.enable_compaction()

    def _unit_scale(self, device) -> torch.Tensor:
        """1 for inner units; p_inner / p_unit for the shared residual mask and the gates, p being
        the parameters one unit removes (adapter.unit_params): their Taylor score, the loss change of
        removing the unit, is then per average inner unit's worth of parameters."""
        par = self.adapter.unit_params(self.model, self.sites, self.points)
        scale = torch.ones(self.arena.n_units)
        for name, slot in self.arena.slots.items():
            if name in par:
                scale[slot.offset : slot.offset + slot.units] = par["inner"] / par[name]
        return scale.to(device)

    # -- masks on the model ----------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """mask name (``<module path>.in`` / ``.out``) -> 1-D float view into the arena (writable)."""
        return self.arena.masks()

    @property
    def needs_sq(self) -> bool:
        return self.criterion.needs_sq

    def attach(self) -> "Pruner":
        """Put arena-backed masks on every site: the model now computes the masked forward, and
        backward accumulates mask gradients (and what else the criterion reads: per-sample squares,
        input activation squares) into the arena (into the compacted model's own buffers when
        compacted; they reach the arena at the next macro-step, before scoring)."""
        self._attached = True
        self._mark_act()
        if self._phys is not None:
            self._phys.attach(self.model, self.needs_sq)
            return self
        a = self.arena
        for s in self.sites:
            lin = self.model.get_submodule(s.path)
            b = MaskBinding()
            for side, spec in (("in", s.mask_in), ("out", s.mask_out)):
                if spec is None:
                    continue
                n = s.mask_name(side)
                setattr(b, f"mask_{side}", a.mask_view(n))
                setattr(b, f"block_{side}", spec.block)
                setattr(b, f"grad_{side}", a.grad_view(n))
                if self.needs_sq:
                    setattr(b, f"sq_{side}", a.sq_view(n))
            if self.criterion.needs_act and s.mask_in is not None:
                b.act_sq = a.act_view(s.mask_name("in"))  # one entry per input channel
            attach(lin, b)
        for pt in self.points:
            attach_point(self.model.get_submodule(pt.path), pt.where, a.mask_view(pt.name), pt.block,
                         a.grad_view(pt.name))
        return self

    def _mark_act(self) -> None:
        """Input-side masks collect activation squares when the criterion reads them (the arena
        then scores those units from them; other units see act_units False)."""
        if self.criterion.needs_act:
            for s in self.sites:
                if s.mask_in is not None:
                    self.arena.act_view(s.mask_name("in"))

    def detach(self) -> None:
        """Take the masks off; a compacted model is restored to its original shapes and weights
        (from the host copy), so after ``detach`` the model is the one the Pruner was given."""
        detach_masks(self.model)
        self._attached = False
        if self._phys is not None:
            _transplant(self.model, _host_copy_to(self._orig, self.model, _device_of(self.model)))
            self._phys = None

    def expand_(self) -> None:
        """Undo compaction: the model gets its original shapes and weights back (masks, if attached,
        stay attached at full size); the next pruning macro-step compacts again. calibrate ends
        with this, so after it the model is the full-size masked model, as without compaction."""
        if self._phys is None:
            return
        was = self._attached
        self.detach()
        if was:
            self.attach()

    # -- compaction ------------------------------------------------------------------------------
    @property
    def compacted(self) -> bool:
        """True while the model is physically shrunk to its live units."""
        return self._phys is not None

    def enable_compaction(self) -> None:
        """Start compacting (idempotent): takes the host copy of the model's weights now."""
        self.compact = True
        if self._orig is None:
            orig = copy.deepcopy(self.model)
            detach_masks(orig)
            self._orig = orig.to("cpu")

    @torch.no_grad()
    def compact_(self) -> None:
        """Rebuild the model in place (same top-level object) at the shapes the adapter's plan gives
        for the current masks, from the host copy of the original weights, NOT folding the masks:
        every kept channel keeps its mask value (0 or not) and its gradient lands in its arena slot.
        Exact: a unit the plan removes contributes exactly zero to the masked model, so its mask
        gradient there is exactly zero too (docs/METHOD.md "Compaction"). Called after every
        macro-step that pruned and by :meth:`load_state_dict`; call it yourself after writing to
        ``pruner.masks`` by hand. Masks that would cut a unit's block apart leave the model as it
        is (the masks are still refreshed)."""
        if self._orig is None:
            self.enable_compaction()
        masks = {n: m.detach().cpu() for n, m in self.masks.items()}
        plan = self.adapter.plan(self._orig, masks, sites=self.sites)  # the Pruner's sites (residual sides dropped)
        phys = _Physical.build(self.arena, self.sites, plan, self._orig, self.criterion.needs_act, self.points)
        if phys is None:  # a partial block: keep the layout, refresh the mask values
            if self._phys is not None:
                self._phys.refresh(self.arena)
            return
        dev = _device_of(self.model)
        was_attached = self._attached
        detach_masks(self.model)
        new = copy.deepcopy(self._orig)
        sd = new.state_dict()
        gathered = gather_planned(sd, plan)
        self.adapter.apply_plan(new, plan)
        load_exact(new, {**sd, **gathered})
        new.to(dev)
        for p_ in new.parameters():
            p_.requires_grad_(False)
        new.train(self.model.training)
        _transplant(self.model, new)
        self._phys = phys.to(dev)
        self._phys.refresh(self.arena)
        if was_attached:
            self._phys.attach(self.model, self.needs_sq)

    # -- the schedule ----------------------------------------------------------------------------
    def ratio_per_step(self) -> float:
        if self.samples_per_epoch is None:
            return self.prune_ratio_per_epoch  # one macro step per epoch
        steps = max(1, math.ceil(self.samples_per_epoch / self.macro_batch_size))
        return self.prune_ratio_per_epoch / steps

    # The one path of a macro-step: step(n) counts samples and, at a macro-batch boundary, calls
    # prune_now(); finish_epoch() calls prune_now() for an epoch's tail; prune_now() gathers the
    # statistics into the arena, syncs ranks, runs ScoreArena.step and returns its StepResult
    # with the Pruner's macro-step count and cap.
    def step(self, n_samples: int) -> StepInfo | None:
        """Call after each backward with the micro-batch size (under torch.distributed: the global
        one, all ranks together); prunes at macro-batch boundaries (returns the StepResult, else
        None)."""
        self._seen += int(n_samples)
        if self._seen < self.macro_batch_size:
            return None
        self._seen = 0
        return self.prune_now()

    def start_epoch(self) -> None:
        """Restart the macro-batch sample counter (calibrate calls it at the start of every epoch,
        after :meth:`finish_epoch` has consumed the previous epoch's tail)."""
        self._seen = 0

    def finish_epoch(self) -> StepInfo | None:
        """At an epoch's end: one macro step over the windows seen since the last one, if any (an
        epoch of ``n`` windows thus runs ``ceil(n / macro_batch_size)`` steps, the count
        :meth:`ratio_per_step` divides by), so a partial macro-batch is never carried into the next
        epoch nor lost."""
        if self._seen == 0 or self.done:
            self._seen = 0
            return None
        self._seen = 0
        return self.prune_now()

    @property
    def pending_samples(self) -> int:
        """Samples accumulated since the last macro step."""
        return self._seen

    def prune_now(self, ratio: float | None = None) -> StepInfo:
        """One macro step now (score, EMA, global threshold, prune: docs/METHOD.md, "Stage 1") over everything accumulated since the last one."""
        a = self.arena
        if self.done:
            a.zero_grad_()
            if self._phys is not None:
                self._phys.zero_()
            n = a.n_live()
            return StepInfo(pruned=0, live_before=n, live_after=n, k=0, total=a.n_units,
                            macro_step=self.macro_steps, capped=True)
        total = a.n_units
        r = self.ratio_per_step() if ratio is None else ratio
        floor_live = total - math.floor(self.max_prune_ratio * total)
        if self._phys is not None:  # the compacted model's sums into their arena slots (one op)
            self._phys.flush_(a)
        if self.criterion.reads_weights:
            self._weight_stats_()
        if self.comm is not None:  # one flat all-reduce of the arena's sums, before scoring
            self.comm.reduce_(a)
        # the arena caps k so that at least floor_live units stay (zero-score units still go)
        # unit_scale: residual / gate scores per average inner unit's parameters (None: all 1)
        res = a.step(self.criterion, self.ema, ratio=r, min_live=floor_live, scale=self.unit_scale)
        if "residual" in a.slots:
            res = self._keep_stream_(res)
        if self.comm is not None:  # every rank takes rank 0's masks: they can never diverge
            self.comm.sync_state_(a)
            after = a.n_live()
            res = dataclasses.replace(res, pruned=res.live_before - after, live_after=after)
        capped = res.live_after <= floor_live
        self.macro_steps += 1
        self.done = capped
        info = dataclasses.replace(res, macro_step=self.macro_steps, capped=capped)
        self.history.append(info)
        if self.compact and res.pruned > 0:
            self.compact_()
        return info

    @torch.no_grad()
    def _keep_stream_(self, res):
        """The stream keeps at least one unit (a model without one computes nothing and cannot be
        repacked): if a step took its last, the unit of highest importance among those comes back."""
        sl = self.arena.slots["residual"]
        m = self.arena.mask[sl.offset : sl.offset + sl.units]
        if bool((m != 0).any()):
            return res
        imp = self.arena.imp[sl.offset : sl.offset + sl.units]
        m[int(imp.abs().argmax())] = 1.0
        return dataclasses.replace(res, pruned=res.pruned - 1, live_after=res.live_after + 1)

    @torch.no_grad()
    def _weight_stats_(self) -> None:
        """The arena's ``wsq``: squared L2 norm of every masked weight channel (columns of input
        masks, rows of output masks) of the full-size weights, in fp32 (fp32 math for half
        weights). One pass over the weights per macro-step; the weights live in the model, so
        this is the Pruner's job, not the arena's."""
        src = self._orig if self._phys is not None else self.model  # full-size weights
        for s in self.sites:
            w = src.get_submodule(s.path).weight.to(self.arena.device)
            if w.dtype in (torch.float16, torch.bfloat16):
                w = w.float()
            w2 = w.square()
            for side, spec, dim in (("in", s.mask_in, 0), ("out", s.mask_out, 1)):
                if spec is not None:
                    self.arena.wsq_view(s.mask_name(side)).copy_(w2.sum(dim))

    # -- results ---------------------------------------------------------------------------------
    def pruned_fraction(self) -> float:
        return 1.0 - self.arena.n_live() / self.arena.n_units

    def sparsity_by_site(self) -> dict[str, float]:
        """mask name -> fraction of its units pruned (for tables and the heatmap)."""
        live = self.arena.live_per_mask().tolist()
        return {n: 1.0 - l / s.units for (n, s), l in zip(self.arena.slots.items(), live)}

    def state_dict(self) -> dict:
        return {"arena": self.arena.state_dict(), "macro_steps": self.macro_steps, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.arena.load_state_dict(state["arena"])
        self.macro_steps = state["macro_steps"]
        self.done = state["done"]
        if self._phys is not None or (self.compact and self.arena.n_live() < self.arena.n_units):
            self.compact_()

    def repack(self) -> nn.Module:
        """A new, physically smaller model (same class) computing what the masked model computes;
        the pruned model carries its plan as ``model.tsprune_plan``. The original is untouched."""
        masks = {n: m.detach().clone() for n, m in self.masks.items()}
        if self._phys is None:
            new, plan = repack_model(self.model, self.adapter, self.sites, masks, self.points)
        else:  # from the original weights (repack_model copies them itself), exactly as without compaction
            new, plan = repack_model(self._orig, self.adapter, self.sites, {n: m.cpu() for n, m in masks.items()},
                                     self.points)
            new.to(_device_of(self.model)).train(self.model.training)
        new.tsprune_plan = plan
        return new


# -- compaction internals ----------------------------------------------------------------------------

def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _host_copy_to(orig: nn.Module, like: nn.Module, device: torch.device) -> nn.Module:
    new = copy.deepcopy(orig).to(device)
    new.train(like.training)
    return new


_KEEP_OWN = ("training",)


def _transplant(dst: nn.Module, src: nn.Module) -> None:
    """Make ``dst`` (the object the user holds) compute what ``src`` computes: its submodules,
    parameters, buffers and attributes are replaced by ``src``'s; its own hooks and mode stay."""
    keep = {k: v for k, v in dst.__dict__.items() if "hook" in k or k in _KEEP_OWN}
    dst.__dict__.clear()
    dst.__dict__.update(src.__dict__)
    dst.__dict__.update(keep)


class _Physical:
    """Statistics buffers of the compacted model and where each entry lives in the arena.

    flat [2P + Q] fp32: grad [P] | sq [P] of every physically present unit, then act [Q] (the
    kept input channels of input masks, when the criterion reads activations); mask [P] fp32 (the
    gathered arena values); idx [P] int64 (arena unit of each entry); flat_idx [2P + Q] int64
    (position of each flat entry in ``arena.flat``, so one index_add_ flushes everything);
    views: site path -> {side: (offset, units, block)}; act_views: site path -> (offset, channels);
    point_views: (module path, where, mask name) -> (offset, units, block) of the live hook masks (the stream's
    kept units where it enters the blocks, the gates of sub-blocks still present)."""

    def __init__(self, idx: torch.Tensor, views: dict, act_idx: torch.Tensor, act_views: dict, arena):
        p = idx.numel()
        self.idx = idx
        self.mask = torch.ones(p)
        self.flat = torch.zeros(2 * p + act_idx.numel())
        self.acc = self.flat[: 2 * p].view(2, p)
        self.act = self.flat[2 * p :]
        self.views = views
        self.act_views = act_views
        act_off = arena.flat_offset("act") if arena.act is not None else 0
        self.flat_idx = torch.cat([idx, idx + arena.n_units, act_idx + act_off])
        self._leaf: dict[tuple[str, str], torch.Tensor] = {}
        self.point_views: dict[tuple[str, str, str], tuple[int, int, int]] = {}

    @classmethod
    def build(cls, arena, sites, plan, orig, act: bool = False, points=()) -> "_Physical | None":
        idx, views, act_idx, act_views, off, aoff = [], {}, [], {}, 0, 0
        for s in sites:
            spec_l = plan.linears.get(s.path)
            if spec_l is not None and spec_l.get("zero"):
                continue  # a ZeroLinear: no weight, nothing to mask; its units' gradients are 0
            keep = plan.keep.get(f"{s.path}.weight", {})
            lin = orig.get_submodule(s.path)
            for side, spec, key, width in (("in", s.mask_in, "cols", lin.in_features),
                                           ("out", s.mask_out, "rows", lin.out_features)):
                if spec is None:
                    continue
                ch = keep.get(key)
                ch = torch.arange(width) if ch is None else torch.as_tensor(ch, dtype=torch.long)
                units = ch[:: spec.block] // spec.block
                if ch.numel() % spec.block or not torch.equal(
                        ch, (units[:, None] * spec.block + torch.arange(spec.block)).reshape(-1)):
                    return None
                name = s.mask_name(side)
                idx.append(units + arena.slots[name].offset)
                views.setdefault(s.path, {})[side] = (off, units.numel(), spec.block)
                off += units.numel()
                if act and side == "in":  # the kept input channels, at their arena channel positions
                    act_idx.append(ch + arena.slots[name].channel_offset)
                    act_views[s.path] = (aoff, ch.numel())
                    aoff += ch.numel()
        point_views = {}
        stream = plan.extra.get("residual")  # kept stream channels (None: the whole width)
        for pt in points:
            slot = arena.slots[pt.name]
            if pt.name.endswith(".gate"):
                if plan.extra.get("gates", {}).get(pt.name[: -len(".gate")]) == 0:
                    continue  # the sub-block is gone; its gate's gradient is exactly 0
                units = torch.zeros(1, dtype=torch.long)
                block = len(stream) if stream is not None else pt.block  # the gated output's width now
            else:
                ch = torch.arange(slot.units * slot.block) if stream is None else torch.as_tensor(stream)
                units, block = ch[:: slot.block] // slot.block, slot.block
            idx.append(units + slot.offset)
            point_views[(pt.path, pt.where, pt.name)] = (off, units.numel(), block)
            off += units.numel()
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
        phys = cls(cat(idx), views, cat(act_idx), act_views, arena)
        phys.point_views = point_views
        return phys

    def to(self, device) -> "_Physical":
        self.idx, self.mask, self.flat_idx = self.idx.to(device), self.mask.to(device), self.flat_idx.to(device)
        p = self.idx.numel()
        self.flat = self.flat.to(device)
        self.acc, self.act = self.flat[: 2 * p].view(2, p), self.flat[2 * p :]
        return self

    def refresh(self, arena) -> None:
        with torch.no_grad():
            self.mask.copy_(arena.mask[self.idx])

    def zero_(self) -> None:
        self.flat.zero_()

    def attach(self, model: nn.Module, needs_sq: bool) -> None:
        for path, sides in self.views.items():
            lin = model.get_submodule(path)
            b = MaskBinding()
            for side, (o, u, blk) in sides.items():
                leaf = self._leaf.get((path, side))
                if leaf is None:
                    leaf = self.mask[o : o + u].detach().requires_grad_(True)
                    self._leaf[(path, side)] = leaf
                setattr(b, f"mask_{side}", leaf)
                setattr(b, f"block_{side}", blk)
                setattr(b, f"grad_{side}", self.acc[0, o : o + u])
                if needs_sq:
                    setattr(b, f"sq_{side}", self.acc[1, o : o + u])
            if path in self.act_views:
                o, n = self.act_views[path]
                b.act_sq = self.act[o : o + n]
            attach(lin, b)
        for (path, where, name), (o, u, blk) in self.point_views.items():
            leaf = self._leaf.get((path, name))
            if leaf is None:
                leaf = self.mask[o : o + u].detach().requires_grad_(True)
                self._leaf[(path, name)] = leaf
            attach_point(model.get_submodule(path), where, leaf, blk, self.acc[0, o : o + u])

    def flush_(self, arena) -> None:
        """Every sum (grad, sq, act) -> its arena position (one index_add_); zeroes."""
        arena.flat.index_add_(0, self.flat_idx, self.flat)
        self.zero_()
