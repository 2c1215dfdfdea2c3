"""ScoreArena: every mask of a model in one set of flat, contiguous fp32 buffers.

Stage of the flow: masks live here; masked_linear reads them (per-module views) and writes mask
gradients into the arena's accumulators in place during backward; ``step`` turns the accumulated
statistics into scores (a Criterion, criteria.py), EMA importance, a global threshold and pruned
units in a fixed handful of tensor ops, whatever the number of modules (no Python loop over
modules, one host sync for the count of live units).

Buffers (U = total units of all masks, C = total channels = sum of units * block, M = masks):

    mask   [U]      1 = live, 0 = pruned (any float value is allowed; ``!= 0`` means live)
    imp    [U]      EMA importance (0 for pruned units)
    flat   [2U (+C) (+C)] fp32, every statistic (criteria.STATS) in one buffer, in this order:
      acc  [2, U]   = flat[:2U]: row 0 ``grad`` (sum of g over the macro-batch), row 1 ``sq``
                    (sum_i g_i**2); always present (masked_linear's accumulators point here)
      act  [C]      sum of x_j**2 per input channel of the masks that collect activations (only
                    when a criterion reading ``act`` was given at construction)
      wsq  [C]      squared L2 norm per weight channel (only when ``wsq`` was asked for); written
                    by the weights' owner, not a sum over samples
    The sums over samples (grad, sq, act) come first, so the ones a criterion reads are ONE
    contiguous slice (:meth:`ScoreArena.sample_sums`): data-parallel ranks all-reduce it in one call.
    offsets [M+1] int64, blocks [M] int64, unit_slot [U] int64 (which mask each unit belongs to),
    chan_offsets [M+1] int64 (channel offset of every mask in act / wsq)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor

from .criteria import SAMPLE_SUMS, STATS, Criterion, get_criterion
from .ops._checks import SIZE_MAX, as_int
from .ops.scores import block_reduce, ema_update_
from .ops.select import _prune_lowest_checked_

#: the gradient criteria of the first arena (kept for old imports; criteria.criterion_names() has all)
CRITERIA = ("taylor", "taylor2", "fisher")


@dataclass(frozen=True)
class Slot:
    """One mask: its units are ``[offset, offset + units)`` of the per-unit buffers, its channels
    ``[channel_offset, channel_offset + units * block)`` of the per-channel ones (act, wsq)."""

    name: str
    offset: int
    units: int
    block: int
    channel_offset: int = 0


@dataclass(frozen=True)
class StepResult:
    """What one pruning step did; the one result type of ``ScoreArena.step`` and of the Pruner's
    ``step`` / ``prune_now`` / ``finish_epoch`` (``tsprune.pruner.StepInfo`` is this class).

    pruned: units pruned by this step; live_before / live_after: live units around it; k: the
    count asked of the threshold (zero-importance units go on top of it); total: units in the
    arena; macro_step: steps taken so far, this one included (the Pruner's macro-step count);
    capped: the Pruner's max_prune_ratio is reached (no more ranking)."""

    pruned: int
    live_before: int
    live_after: int
    k: int
    total: int = 0
    macro_step: int = 0
    capped: bool = False

    @property
    def live(self) -> int:
        """``live_after`` (the old StepInfo field name)."""
        return self.live_after


class ScoreArena:
    """Flat mask / score / gradient buffers for many masks.

    ``specs``: ordered (name, units, block) triples or a mapping name -> (units, block).
    ``stats``: the statistics the criterion in use reads (names from criteria.STATS, or a
    Criterion / registered name, whose ``stats`` are taken): ``act`` / ``wsq`` buffers are only
    allocated when asked for, and :meth:`sample_sums` covers exactly the sums it reads. None: the
    gradient sums (``grad``, ``sq``), as before criteria were objects.
    """

    def __init__(self, specs: Iterable[tuple[str, int, int]] | Mapping[str, tuple[int, int]],
                 device: torch.device | str = "cpu", stats: "Iterable[str] | Criterion | str | None" = None):
        if isinstance(specs, Mapping):
            specs = [(n, u, b) for n, (u, b) in specs.items()]
        self.slots: dict[str, Slot] = {}
        off = coff = 0
        for name, units, block in specs:
            if name in self.slots:
                raise ValueError(f"ScoreArena: duplicate mask name {name!r}")
            if int(units) < 1 or int(block) < 1:
                raise ValueError(f"ScoreArena: mask {name!r} needs units >= 1 and block >= 1, got {units}, {block}")
            units = as_int("ScoreArena", f"units of mask {name!r}", units, 1, SIZE_MAX)
            block = as_int("ScoreArena", f"block of mask {name!r}", block, 1, SIZE_MAX)
            self.slots[name] = Slot(name, off, units, block, coff)
            off += int(units)
            coff += int(units) * int(block)
        if not self.slots:
            raise ValueError("ScoreArena: no masks")
        self.n_units = off
        if stats is None:
            stats = ("grad", "sq")
        elif isinstance(stats, (str, Criterion)):
            stats = get_criterion(stats, "ScoreArena").stats
        stats = tuple(dict.fromkeys(stats))
        bad = [x for x in stats if x not in STATS]
        if bad:
            raise ValueError(f"ScoreArena: unknown statistics {bad}; known: {', '.join(STATS)}")
        self.stats = stats  # what the criterion in use reads (sample_sums covers these)
        dev = torch.device(device)
        sl = list(self.slots.values())
        self.n_channels = sum(s.units * s.block for s in sl)
        # one flat buffer: [grad U | sq U | act C | wsq C], act / wsq only when asked for
        seg = {"grad": (0, off), "sq": (off, 2 * off)}
        end = 2 * off
        for name in ("act", "wsq"):
            if name in stats:
                seg[name] = (end, end + self.n_channels)
                end += self.n_channels
        self._seg = seg
        self.flat = torch.zeros(end, device=dev)
        self.acc = self.flat[: 2 * off].view(2, off)
        self.act = self.flat[slice(*seg["act"])] if "act" in seg else None
        self.wsq = self.flat[slice(*seg["wsq"])] if "wsq" in seg else None
        self.mask = torch.ones(off, device=dev)
        self.imp = torch.zeros(off, device=dev)
        self.offsets = torch.tensor([s.offset for s in sl] + [off], dtype=torch.long, device=dev)
        self.blocks = torch.tensor([s.block for s in sl], dtype=torch.long, device=dev)
        self.unit_slot = torch.repeat_interleave(
            torch.arange(len(sl), device=dev), torch.tensor([s.units for s in sl], device=dev)
        )
        self.chan_offsets = torch.tensor([s.channel_offset for s in sl] + [self.n_channels], dtype=torch.long,
                                         device=dev)
        # block_sum: per distinct block size b, the units with that block and their channels as a
        # [n_b * b] gather index (a handful of sizes, never a loop over masks)
        self._block_groups = []
        for b in sorted({s.block for s in sl}):
            units = [torch.arange(s.offset, s.offset + s.units) for s in sl if s.block == b]
            chans = [torch.arange(s.channel_offset, s.channel_offset + s.units * b)
                     for s in sl if s.block == b]
            self._block_groups.append((b, torch.cat(units).to(dev), torch.cat(chans).to(dev)))
        self._act_slots: set[str] = set()
        self._act_units: Tensor | None = None
        self.steps = 0
        self._leaf_masks: dict[str, Tensor] = {}

    # -- views ---------------------------------------------------------------------------------
    @property
    def grad(self) -> Tensor:
        return self.acc[0]

    @property
    def sq(self) -> Tensor:
        return self.acc[1]

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def _slice(self, buf: Tensor, name: str) -> Tensor:
        s = self.slots[name]
        return buf[s.offset : s.offset + s.units]

    def mask_view(self, name: str) -> Tensor:
        """The mask of ``name`` as a leaf view of the flat buffer with ``requires_grad`` (so backward
        reaches masked_linear even when every weight is frozen); writes go to the arena."""
        v = self._leaf_masks.get(name)
        if v is None:
            v = self._slice(self.mask, name).detach().requires_grad_(True)
            self._leaf_masks[name] = v
        return v

    def grad_view(self, name: str) -> Tensor:
        return self._slice(self.acc[0], name)

    def sq_view(self, name: str) -> Tensor:
        return self._slice(self.acc[1], name)

    def imp_view(self, name: str) -> Tensor:
        return self._slice(self.imp, name)

    def _chan_slice(self, buf: Tensor | None, name: str, stat: str) -> Tensor:
        if buf is None:
            raise ValueError(f"ScoreArena: no {stat!r} buffer; build the arena with a criterion that reads "
                             f"it (stats={self.stats})")
        s = self.slots[name]
        return buf[s.channel_offset : s.channel_offset + s.units * s.block]

    def act_view(self, name: str) -> Tensor:
        """[units * block] fp32 view of ``act`` for mask ``name`` (for act_sq_accumulate_, one entry
        per input channel of the masked Linear); marks the mask as collecting activations (see
        :attr:`act_units`)."""
        v = self._chan_slice(self.act, name, "act")
        if name not in self._act_slots:
            self._act_slots.add(name)
            self._act_units = None
        return v

    def wsq_view(self, name: str) -> Tensor:
        """[units * block] fp32 view of ``wsq`` for mask ``name``: squared L2 norm of each channel."""
        return self._chan_slice(self.wsq, name, "wsq")

    @property
    def act_units(self) -> Tensor:
        """[U] bool: the unit's mask collects activations (an ``act_view`` of it was taken)."""
        if self._act_units is None:
            flags = torch.tensor([n in self._act_slots for n in self.slots], dtype=torch.bool)
            self._act_units = flags.to(self.device)[self.unit_slot]
        return self._act_units

    def block_sum(self, per_channel: Tensor) -> Tensor:
        """[C] per-channel values -> [U] per-unit sums over each unit's ``block`` channels (one
        gather and one block_reduce per distinct block size), in per_channel's dtype."""
        if per_channel.shape != (self.n_channels,):
            raise ValueError(f"ScoreArena.block_sum: expected shape ({self.n_channels},), got "
                             f"{tuple(per_channel.shape)}")
        out = torch.empty(self.n_units, dtype=per_channel.dtype, device=per_channel.device)
        for b, units, chans in self._block_groups:
            out[units] = block_reduce(per_channel[chans], b, "sum")
        return out

    def flat_offset(self, stat: str) -> int:
        """Where statistic ``stat`` starts in ``flat`` (KeyError when the arena does not hold it)."""
        return self._seg[stat][0]

    def sample_sums(self) -> Tensor | None:
        """The smallest contiguous slice of ``flat`` holding every sum over samples (grad, sq, act)
        that this arena's criterion reads, or None when it reads none (e.g. magnitude): what
        data-parallel ranks all-reduce, in one call, before every step."""
        segs = [self._seg[x] for x in SAMPLE_SUMS if x in self.stats and x in self._seg]
        if not segs:
            return None
        return self.flat[min(a for a, _ in segs) : max(b for _, b in segs)]

    def masks(self) -> dict[str, Tensor]:
        """name -> writable view of the mask (no grad)."""
        return {n: self._slice(self.mask, n) for n in self.slots}

    # -- bookkeeping -----------------------------------------------------------------------------
    def zero_grad_(self) -> None:
        """Zero every sum over samples (grad, sq, act; one op); weight norms stay."""
        self.flat[: self._seg["act"][1] if "act" in self._seg else 2 * self.n_units].zero_()

    def n_live(self) -> int:
        return int((self.mask != 0).sum())

    def live_per_mask(self) -> Tensor:
        """[M] number of live units of every mask (one scatter op)."""
        out = torch.zeros(len(self.slots), dtype=torch.long, device=self.device)
        return out.index_add_(0, self.unit_slot, (self.mask != 0).long())

    def check_finite(self) -> None:
        bad = ~torch.isfinite(self.acc).all(0)
        if bool(bad.any()):
            names = list(self.slots)
            slots = sorted(set(self.unit_slot[bad].tolist()))
            raise ValueError(
                "ScoreArena: non-finite (NaN/Inf) mask gradients in "
                + ", ".join(names[i] for i in slots[:8])
                + (f" and {len(slots) - 8} more" if len(slots) > 8 else "")
            )

    # -- scoring + pruning -----------------------------------------------------------------------
    def _criterion(self, criterion: "str | Criterion") -> Criterion:
        c = get_criterion(criterion, "ScoreArena")
        missing = [x for x in c.stats if x not in self.stats]  # held AND fed: others would read zeros
        if missing:
            raise ValueError(f"ScoreArena: criterion {c.name!r} reads {', '.join(missing)}, which this arena "
                             f"does not hold; build it with ScoreArena(..., stats={c.name!r})")
        return c

    def scores(self, criterion: "str | Criterion" = "taylor") -> Tensor:
        """Flat [U] score of every unit from the arena's statistics (a new tensor; the arena is not
        changed). ``criterion``: a registered name or a Criterion."""
        c = self._criterion(criterion)
        s = c.score(self)
        if s.shape != self.imp.shape:
            raise ValueError(f"ScoreArena: criterion {c.name!r} returned shape {tuple(s.shape)}, "
                             f"expected ({self.n_units},)")
        return s

    def step(self, criterion: "str | Criterion" = "taylor", ema: float = 1.0, *, ratio: float | None = None,
             k: int | None = None, score: Tensor | None = None, check_finite: bool = True,
             min_live: int = 0, scale: Tensor | None = None) -> StepResult:
        """One pruning step (score, EMA, global threshold, prune; docs/METHOD.md "Stage 1"): score (``criterion`` from the arena's statistics, or
        the flat ``score`` given), EMA into ``imp`` (the first step takes the score as is),
        then prune ``k`` units, or ``ceil(ratio * live)``, of lowest |imp| over the whole arena plus
        the live units whose importance is exactly 0; never more than leaves ``min_live`` units
        (zero-importance units are pruned regardless). Zeroes the accumulators afterwards.

        k: any int >= 0 (more than the live units prunes down to ``min_live``); min_live >= 0.
        scale: optional [U] multiplier of the score before the EMA (units of different cost, e.g.
        scores per parameter removed).

        A refused step (NaN / Inf in the accumulated gradients, in the criterion's score or in
        ``score``) raises ValueError
        and discards the macro-batch: it zeroes the accumulators and changes nothing else (masks,
        importance and step count stay as they were), so the arena is usable again at once - the
        caller goes on with the next macro-batch (or stops); no ``zero_grad_()`` call is needed.

        Host syncs: one finite check (when ``check_finite``), one count of live units, the prune."""
        if (ratio is None) == (k is None):
            raise ValueError("ScoreArena.step: give exactly one of ratio or k")
        if ratio is not None and not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ScoreArena.step: ratio must be in [0, 1], got {ratio}")
        if not 0.0 <= ema <= 1.0:
            raise ValueError(f"ScoreArena.step: ema must be in [0, 1], got {ema}")
        if k is not None:
            k = as_int("ScoreArena.step", "k", k, 0, None)  # capped to the live units below
        min_live = as_int("ScoreArena.step", "min_live", min_live, 0, None)
        skipped = ("; this macro-batch was skipped: the accumulators were zeroed, masks and importance "
                   "are unchanged, and the arena is ready for the next macro-batch")
        if score is None:
            c = self._criterion(criterion)  # raises naming the criteria
            if check_finite and c.reads_grads:  # names the masks with bad gradients
                try:
                    self.check_finite()
                except ValueError as e:
                    self.zero_grad_()
                    raise ValueError(f"{e}{skipped}") from None
            s = self.scores(c)
            # every criterion's score, not only the statistics: a custom rule can make NaN from
            # finite sums, and a refused step must change nothing (no EMA, no pruning)
            if check_finite and not bool(torch.isfinite(s).all()):
                self.zero_grad_()
                raise ValueError(f"ScoreArena.step: the {c.name} score contains NaN or Inf{skipped}")
            s = s.to(self.imp.dtype)
        else:
            if score.shape != self.imp.shape:
                raise ValueError(f"ScoreArena.step: score has shape {tuple(score.shape)}, arena has ({self.n_units},)")
            if check_finite and not bool(torch.isfinite(score).all()):
                self.zero_grad_()
                raise ValueError(f"ScoreArena.step: the given score contains NaN or Inf{skipped}")
            s = score.to(self.imp.dtype)
        if scale is not None:
            if scale.shape != self.imp.shape:
                raise ValueError(f"ScoreArena.step: scale has shape {tuple(scale.shape)}, arena has ({self.n_units},)")
            s = s * scale.to(s)
        live = self.mask != 0
        if self.steps == 0:
            self.imp.copy_(s)
        else:
            ema_update_(self.imp, s, ema)
        self.imp.mul_(live)
        n_live = int(live.sum())
        kk = k if k is not None else math.ceil(ratio * n_live - 1e-12)
        kk = max(0, min(kk, n_live - min_live))
        # imp is finite here (checked inputs, EMA of finite values): skip prune_lowest_'s own check
        n = _prune_lowest_checked_(self.mask, self.imp, kk)
        self.steps += 1
        self.zero_grad_()
        return StepResult(pruned=n, live_before=n_live, live_after=n_live - n, k=kk, total=self.n_units,
                          macro_step=self.steps)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "names": list(self.slots),
            "units": [s.units for s in self.slots.values()],
            "blocks": [s.block for s in self.slots.values()],
            "mask": self.mask.clone(),
            "imp": self.imp.clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != list(self.slots) or state["units"] != [s.units for s in self.slots.values()]:
            raise ValueError("ScoreArena.load_state_dict: the saved layout does not match this arena")
        with torch.no_grad():
            self.mask.copy_(state["mask"])
            self.imp.copy_(state["imp"])
        self.steps = int(state["steps"])
        self.zero_grad_()

    def __repr__(self) -> str:
        return f"ScoreArena({len(self.slots)} masks, {self.n_units} units, device={self.device})"
