"""ScoreArena: every mask of a model in one set of flat, contiguous fp32 buffers.

Stage of the flow: masks live here; masked_linear reads them (per-module views) and writes mask
gradients into the arena's accumulators in place during backward; ``step`` turns the accumulated
gradients into scores, EMA importance, a global threshold and pruned units in a fixed handful of
tensor ops, whatever the number of modules (no Python loop over modules, one host sync for the
count of live units).

Buffers (U = total units of all masks, M = number of masks):

    mask   [U]      1 = live, 0 = pruned (any float value is allowed; ``!= 0`` means live)
    imp    [U]      EMA importance (0 for pruned units)
    acc    [2, U]   row 0: gradient sum g over the macro-batch; row 1: sum_i g_i**2 (taylor2/fisher).
                    One tensor, so data-parallel ranks all-reduce it in one call.
    offsets [M+1] int64, blocks [M] int64, unit_slot [U] int64 (which mask each unit belongs to)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor

from .ops._checks import SIZE_MAX, as_int
from .ops.scores import ema_update_, fisher_score, taylor2_score, taylor_score
from .ops.select import _prune_lowest_checked_

CRITERIA = ("taylor", "taylor2", "fisher")


@dataclass(frozen=True)
class Slot:
    name: str
    offset: int
    units: int
    block: int


@dataclass(frozen=True)
class StepResult:
    pruned: int
    live_before: int
    live_after: int
    k: int


class ScoreArena:
    """Flat mask / score / gradient buffers for many masks.

    ``specs``: ordered (name, units, block) triples or a mapping name -> (units, block).
    """

    def __init__(self, specs: Iterable[tuple[str, int, int]] | Mapping[str, tuple[int, int]],
                 device: torch.device | str = "cpu"):
        if isinstance(specs, Mapping):
            specs = [(n, u, b) for n, (u, b) in specs.items()]
        self.slots: dict[str, Slot] = {}
        off = 0
        for name, units, block in specs:
            if name in self.slots:
                raise ValueError(f"ScoreArena: duplicate mask name {name!r}")
            if int(units) < 1 or int(block) < 1:
                raise ValueError(f"ScoreArena: mask {name!r} needs units >= 1 and block >= 1, got {units}, {block}")
            units = as_int("ScoreArena", f"units of mask {name!r}", units, 1, SIZE_MAX)
            block = as_int("ScoreArena", f"block of mask {name!r}", block, 1, SIZE_MAX)
            self.slots[name] = Slot(name, off, units, block)
            off += int(units)
        if not self.slots:
            raise ValueError("ScoreArena: no masks")
        self.n_units = off
        dev = torch.device(device)
        self.mask = torch.ones(off, device=dev)
        self.imp = torch.zeros(off, device=dev)
        self.acc = torch.zeros(2, off, device=dev)
        sl = list(self.slots.values())
        self.offsets = torch.tensor([s.offset for s in sl] + [off], dtype=torch.long, device=dev)
        self.blocks = torch.tensor([s.block for s in sl], dtype=torch.long, device=dev)
        self.unit_slot = torch.repeat_interleave(
            torch.arange(len(sl), device=dev), torch.tensor([s.units for s in sl], device=dev)
        )
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

    def masks(self) -> dict[str, Tensor]:
        """name -> writable view of the mask (no grad)."""
        return {n: self._slice(self.mask, n) for n in self.slots}

    # -- bookkeeping -----------------------------------------------------------------------------
    def zero_grad_(self) -> None:
        self.acc.zero_()

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
    def scores(self, criterion: str = "taylor") -> Tensor:
        """Flat score of every unit from the accumulated gradients (a new tensor)."""
        if criterion == "taylor":
            return taylor_score(self.acc[0], self.mask)
        if criterion == "taylor2":
            return taylor2_score(self.acc[0], self.acc[1])
        if criterion == "fisher":
            return fisher_score(self.acc[1])
        raise ValueError(f"ScoreArena: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")

    def step(self, criterion: str = "taylor", ema: float = 1.0, *, ratio: float | None = None,
             k: int | None = None, score: Tensor | None = None, check_finite: bool = True,
             min_live: int = 0) -> StepResult:
        """One pruning step (SPEC steps 4-6): score (from the accumulators, or the flat ``score``
        given, e.g. magnitude / Wanda), EMA into ``imp`` (the first step takes the score as is),
        then prune ``k`` units, or ``ceil(ratio * live)``, of lowest |imp| over the whole arena plus
        the live units whose importance is exactly 0; never more than leaves ``min_live`` units
        (zero-importance units are pruned regardless). Zeroes the accumulators afterwards.

        k: any int >= 0 (more than the live units prunes down to ``min_live``); min_live >= 0.

        A refused step (NaN / Inf in the accumulated gradients or in ``score``) raises ValueError
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
            if criterion not in CRITERIA:
                self.scores(criterion)  # raises naming the criteria
            if check_finite:
                try:
                    self.check_finite()
                except ValueError as e:
                    self.zero_grad_()
                    raise ValueError(f"{e}{skipped}") from None
            s = self.scores(criterion)
        else:
            if score.shape != self.imp.shape:
                raise ValueError(f"ScoreArena.step: score has shape {tuple(score.shape)}, arena has ({self.n_units},)")
            if check_finite and not bool(torch.isfinite(score).all()):
                self.zero_grad_()
                raise ValueError(f"ScoreArena.step: the given score contains NaN or Inf{skipped}")
            s = score.to(self.imp.dtype)
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
        return StepResult(pruned=n, live_before=n_live, live_after=n_live - n, k=kk)

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
