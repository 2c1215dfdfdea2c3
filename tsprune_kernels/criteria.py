"""Pruning criteria as objects: which arena statistics a criterion reads, and how it scores.

Stage of the flow: a ScoreArena holds every statistic in flat buffers (see arena.py); a Criterion
names the statistics it needs (so the arena allocates them, the pipeline binds only those to the
masked forward, and data-parallel ranks all-reduce exactly those) and turns them into one flat
score per unit. Nothing here knows about models: weight norms arrive as numbers in the arena.

Statistics (all fp32, in the arena's flat buffers; U = units, C = channels = sum of units * block):

    grad  [U]  sum over the macro-batch of the mask gradient g            (summed over samples/ranks)
    sq    [U]  sum over samples of g_i**2 (per-sample squares)           (summed over samples/ranks)
    act   [C]  sum of x_j**2 of the Linear's input channel j, for the masks whose slot collects
               activations (``ScoreArena.act_view``; other slots stay 0)  (summed over samples/ranks)
    wsq   [C]  squared L2 norm of weight channel j (column of an input mask, row of an output
               mask), written by whoever owns the weights before each step (not summed)

Registered by name: taylor, taylor2, fisher, magnitude, wanda. Pass a name or a Criterion
anywhere a criterion is taken (``ScoreArena.step``, ``tsprune.Pruner``, the CLI takes names).

    crit = Criterion("grad_abs", ("grad",), lambda a: a.grad.abs())   # or subclass, override score
    register_criterion(crit)                                          # now "grad_abs" works too
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import Tensor

from .ops.scores import fisher_score, taylor2_score, taylor_score

if TYPE_CHECKING:  # pragma: no cover
    from .arena import ScoreArena

#: every statistic an arena can hold, in the order of its flat buffer
STATS = ("grad", "sq", "act", "wsq")
#: the statistics that are sums over samples (zeroed after each step, all-reduced across ranks)
SAMPLE_SUMS = ("grad", "sq", "act")


class Criterion:
    """A pruning criterion: ``stats`` (a subset of :data:`STATS`) it reads from the arena, and
    ``score(arena) -> Tensor`` [U] (any float dtype, any sign; the arena ranks |EMA of it|, and a
    unit whose importance is exactly 0 is always pruned).

    Either pass ``fn(arena) -> Tensor`` or subclass and override :meth:`score`. ``score`` must not
    change the arena (it is also called by tools that only look); it reads ``arena.grad``,
    ``arena.sq``, ``arena.act``, ``arena.wsq``, ``arena.mask``, ``arena.act_units`` and the helper
    ``arena.block_sum(per_channel)`` ([C] -> [U], summing each unit's ``block`` channels)."""

    def __init__(self, name: str, stats: Iterable[str], fn: Callable[["ScoreArena"], Tensor] | None = None,
                 doc: str = ""):
        stats = tuple(dict.fromkeys(stats))  # de-duplicated, order kept
        bad = [s for s in stats if s not in STATS]
        if bad:
            raise ValueError(f"Criterion {name!r}: unknown statistics {bad}; known: {', '.join(STATS)}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"Criterion: name must be a non-empty string, got {name!r}")
        self.name = name
        self.stats = stats
        self._fn = fn
        self.doc = doc

    def score(self, arena: "ScoreArena") -> Tensor:
        if self._fn is None:
            raise NotImplementedError(f"Criterion {self.name!r}: pass fn= or override score()")
        return self._fn(arena)

    __call__ = score

    # what the pipeline needs to know, asked by property rather than by name
    @property
    def needs_sq(self) -> bool:
        """The masked backward must add per-sample squared mask gradients (costs a second GEMM-sized pass)."""
        return "sq" in self.stats

    @property
    def needs_act(self) -> bool:
        """The masked forward must sum the squared input activations of input-side masks."""
        return "act" in self.stats

    @property
    def reads_weights(self) -> bool:
        """Scores read the whole weights outside the forward (weight norms)."""
        return "wsq" in self.stats

    @property
    def reads_grads(self) -> bool:
        return "grad" in self.stats or "sq" in self.stats

    def __repr__(self) -> str:
        return f"Criterion({self.name!r}, stats={self.stats})"

    def __str__(self) -> str:
        return self.name

    # a Criterion equals its registered name, so code that compared the old string keeps working
    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return other == self.name
        return self is other

    def __hash__(self) -> int:
        return hash(self.name)


_REGISTRY: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion, *, replace: bool = False) -> Criterion:
    """Make ``criterion`` available by its name everywhere a name is taken (the CLI's
    ``--criterion`` choices are read when its parser is built). Returns it (usable as a decorator
    result). A name already taken raises unless ``replace``."""
    if not isinstance(criterion, Criterion):
        raise TypeError(f"register_criterion: expected a Criterion, got {type(criterion).__name__}")
    if criterion.name in _REGISTRY and not replace:
        raise ValueError(f"register_criterion: {criterion.name!r} is already registered (pass replace=True)")
    _REGISTRY[criterion.name] = criterion
    return criterion


def criterion_names() -> tuple[str, ...]:
    """Registered names, built-ins first."""
    return tuple(_REGISTRY)


def get_criterion(criterion: "str | Criterion", who: str = "criterion") -> Criterion:
    """A Criterion from a registered name or a Criterion object (returned as is)."""
    if isinstance(criterion, Criterion):
        return criterion
    c = _REGISTRY.get(criterion) if isinstance(criterion, str) else None
    if c is None:
        raise ValueError(f"{who}: criterion must be one of {', '.join(_REGISTRY)} (or a Criterion object), "
                         f"got {criterion!r}")
    return c


# -- the built-in criteria ----------------------------------------------------------------------------
def _magnitude(a: "ScoreArena") -> Tensor:
    return a.block_sum(a.wsq).sqrt()


def _wanda(a: "ScoreArena") -> Tensor:
    # ||X_j|| * ||W_j|| summed per unit where the slot collected activations; magnitude elsewhere
    # (output-side masks: Wanda is defined on input channels)
    w = a.block_sum(a.act.sqrt() * a.wsq.sqrt())
    return torch.where(a.act_units, w, _magnitude(a))


TAYLOR = register_criterion(Criterion("taylor", ("grad",), lambda a: taylor_score(a.grad, a.mask),
                                      "first order: -g * m"))
TAYLOR2 = register_criterion(Criterion("taylor2", ("grad", "sq"), lambda a: taylor2_score(a.grad, a.sq),
                                       "second order, diagonal Fisher: -(sum_i g_i) + 0.5 sum_i g_i**2"))
FISHER = register_criterion(Criterion("fisher", ("sq",), lambda a: fisher_score(a.sq), "sum_i g_i**2"))
MAGNITUDE = register_criterion(Criterion("magnitude", ("wsq",), _magnitude,
                                         "L2 norm of each unit's weight rows / columns"))
WANDA = register_criterion(Criterion("wanda", ("act", "wsq"), _wanda,
                                     "sum over a unit's input channels of ||X_j|| * ||W[:, j]||; "
                                     "output units: magnitude"))
