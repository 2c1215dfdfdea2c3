"""Pruner: the user-facing object of stage 1 (SPEC.md) - masks on a model, scores, global pruning.

Stage of the flow: model -> adapter (sites) -> **Pruner** owns a ScoreArena with one mask per site
side -> masked_linear writes mask gradients into it -> ``step()`` at macro-batch boundaries runs the
arena step (score, EMA, global threshold, prune) -> ``repack()`` hands masks to plan.repack_model.

    pruner = tsprune.Pruner(model, criterion="taylor", ema=0.5, prune_ratio_per_epoch=0.3,
                            macro_batch_size=256, samples_per_epoch=len(train_windows))
    pruner.attach()
    for ctx, tgt in batches:
        adapter.loss(model, ctx, tgt).backward()
        pruner.step(len(ctx))          # prunes when a macro-batch is complete
    small = pruner.repack()
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

import tsprune_kernels as K

from .adapters import get_adapter
from .adapters.base import Adapter, Site
from .masking import MaskBinding, attach, detach_masks
from .plan import repack_model

CRITERIA = ("taylor", "taylor2", "fisher", "magnitude", "wanda")


@dataclass
class StepInfo:
    macro_step: int
    pruned: int
    live: int
    total: int
    capped: bool


class Pruner:
    """Masks, scores and global pruning for one model.

    criterion: taylor (-g*m), taylor2 (-(sum_i g_i) + 0.5 sum_i g_i**2), fisher (sum_i g_i**2),
               magnitude (weight row/column norms) or wanda (||X_j|| * ||W_:,j||; input units only,
               output units fall back to magnitude).
    ema:       smoothing of the importance across macro-steps (SPEC step 5).
    block:     channels per FFN / residual unit; heads: attention units are whole heads.
    prune_ratio_per_epoch, samples_per_epoch, macro_batch_size: the geometric schedule, each macro
               step prunes ceil(r * live) with r = prune_ratio_per_epoch / macro_steps_per_epoch.
    max_prune_ratio: never prune more than this fraction of all units (then ``done`` is True).
    residual:  also mask the residual-stream side of every Linear (q/k/v/up in, o/down out), as the
               paper does. Those zeros stay as zero weights after repack (no saving), so by default
               they are left out and the whole budget goes to units that are physically removed.
    distributed: data-parallel calibration (tsprune.distributed): each macro-step all-reduces the
               flat accumulators once before scoring and takes rank 0's masks after pruning. None
               (default): on when a torch.distributed process group with > 1 rank is initialised.
               Then ``step(n)`` takes the GLOBAL micro-batch size (all ranks together).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: str = "taylor",
        ema: float = 0.5,
        block: int = 1,
        heads: bool = False,
        prune_ratio_per_epoch: float = 0.3,
        macro_batch_size: int = 8192,
        samples_per_epoch: int | None = None,
        max_prune_ratio: float = 0.9,
        residual: bool = False,
        adapter: Adapter | None = None,
        distributed: bool | None = None,
    ):
        if criterion not in CRITERIA:
            raise ValueError(f"Pruner: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
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
        if not residual:
            sites = [
                dataclasses.replace(
                    s,
                    mask_in=None if s.residual_in else s.mask_in,
                    mask_out=None if s.residual_out else s.mask_out,
                )
                for s in sites
            ]
            sites = [s for s in sites if s.mask_in is not None or s.mask_out is not None]
        self.sites: list[Site] = sites
        self.residual = residual
        self.criterion = criterion
        self.ema = ema
        self.prune_ratio_per_epoch = prune_ratio_per_epoch
        self.macro_batch_size = macro_batch_size
        self.samples_per_epoch = samples_per_epoch
        self.max_prune_ratio = max_prune_ratio
        device = next(model.parameters()).device
        specs = []
        for s in self.sites:
            for side, spec in (("in", s.mask_in), ("out", s.mask_out)):
                if spec is not None:
                    specs.append((s.mask_name(side), spec.units, spec.block))
        self.arena = K.ScoreArena(specs, device=device)
        from . import distributed as D

        self.comm = D.ArenaSync() if (D.is_dist() if distributed is None else distributed) else None
        self._act_sq: dict[str, torch.Tensor] = {}
        self._seen = 0
        self.macro_steps = 0
        self.done = False
        self.history: list[StepInfo] = []

    # -- masks on the model ----------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """mask name (``<module path>.in`` / ``.out``) -> 1-D float view into the arena (writable)."""
        return self.arena.masks()

    @property
    def needs_sq(self) -> bool:
        return self.criterion in ("taylor2", "fisher")

    def attach(self) -> "Pruner":
        """Put arena-backed masks on every site: the model now computes the masked forward, and
        backward accumulates mask gradients (and squares for taylor2 / fisher) into the arena."""
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
            if self.criterion == "wanda" and s.mask_in is not None:
                b.act_sq = self._act_sq.setdefault(
                    s.path, torch.zeros(lin.in_features, device=a.device)
                )
            attach(lin, b)
        return self

    def detach(self) -> None:
        detach_masks(self.model)

    # -- the schedule ----------------------------------------------------------------------------
    def ratio_per_step(self) -> float:
        if self.samples_per_epoch is None:
            return self.prune_ratio_per_epoch  # one macro step per epoch
        steps = max(1, math.ceil(self.samples_per_epoch / self.macro_batch_size))
        return self.prune_ratio_per_epoch / steps

    def step(self, n_samples: int) -> StepInfo | None:
        """Call after each backward with the micro-batch size (under torch.distributed: the global
        one, all ranks together); prunes at macro-batch boundaries."""
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
        """One macro step now (SPEC steps 4-6) over everything accumulated since the last one."""
        if self.done:
            self.arena.zero_grad_()
            return StepInfo(self.macro_steps, 0, self.arena.n_live(), self.arena.n_units, True)
        total = self.arena.n_units
        r = self.ratio_per_step() if ratio is None else ratio
        floor_live = total - math.floor(self.max_prune_ratio * total)
        if self.comm is not None:  # one flat all-reduce of the macro-batch's sums, before scoring
            self.comm.reduce_(self)
        score = self._static_score() if self.criterion in ("magnitude", "wanda") else None
        # the arena caps k so that at least floor_live units stay (zero-score units still go)
        res = self.arena.step(self.criterion if score is None else "taylor", self.ema, ratio=r,
                              score=score, min_live=floor_live)
        if self.comm is not None:  # every rank takes rank 0's masks: they can never diverge
            self.comm.sync_state_(self.arena)
            after = self.arena.n_live()
            res = K.StepResult(pruned=res.live_before - after, live_before=res.live_before,
                               live_after=after, k=res.k)
        capped = res.live_after <= floor_live
        self.macro_steps += 1
        self.done = capped
        info = StepInfo(self.macro_steps, res.pruned, res.live_after, total, capped)
        self.history.append(info)
        return info

    @torch.no_grad()
    def _static_score(self) -> torch.Tensor:
        """Flat magnitude / Wanda scores (one pass over the weights; not gradient based)."""
        out = torch.zeros(self.arena.n_units, device=self.arena.device)
        for s in self.sites:
            w = self.model.get_submodule(s.path).weight
            for side, spec, dim in (("in", s.mask_in, 1), ("out", s.mask_out, 0)):
                if spec is None:
                    continue
                if side == "in" and self.criterion == "wanda" and s.path in self._act_sq:
                    sc = K.wanda_score(self._act_sq[s.path], w, spec.block)
                else:
                    sc = K.magnitude_score(w, dim, spec.block)
                self.arena._slice(out, s.mask_name(side)).copy_(sc)
        for acc in self._act_sq.values():
            acc.zero_()
        return out

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

    def repack(self) -> nn.Module:
        """A new, physically smaller model (same class) computing what the masked model computes;
        the pruned model carries its plan as ``model.tsprune_plan``. The original is untouched."""
        masks = {n: m.detach().clone() for n, m in self.masks.items()}
        new, plan = repack_model(self.model, self.adapter, self.sites, masks)
        new.tsprune_plan = plan
        return new
