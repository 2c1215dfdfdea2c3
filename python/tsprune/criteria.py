"""Pruning criteria for the pipeline: the kernels' Criterion objects and registry, re-exported.

Stage of the flow: a Criterion (tsprune_kernels/criteria.py) names the statistics it reads from
the ScoreArena (grad, sq, act, wsq) and scores units from them; the Pruner builds the arena with
exactly those statistics, binds them to the masked model and fills the weight norms; nothing in
the pipeline branches on a criterion's name.

    from tsprune.criteria import Criterion, register_criterion
    crit = Criterion("grad_abs", ("grad",), lambda arena: arena.grad.abs())
    tsprune.Pruner(model, criterion=crit)          # or register_criterion(crit); criterion="grad_abs"
"""
from tsprune_kernels.criteria import (
    FISHER,
    MAGNITUDE,
    SAMPLE_SUMS,
    STATS,
    TAYLOR,
    TAYLOR2,
    WANDA,
    Criterion,
    criterion_names,
    get_criterion,
    register_criterion,
)

__all__ = [
    "Criterion",
    "FISHER",
    "MAGNITUDE",
    "SAMPLE_SUMS",
    "STATS",
    "TAYLOR",
    "TAYLOR2",
    "WANDA",
    "criterion_names",
    "get_criterion",
    "register_criterion",
]
