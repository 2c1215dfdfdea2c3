"""tsprune_kernels: fused kernels for structured pruning during calibration.

Public API (a stable contract; see docs/KERNELS.md for formulas and implementation notes):

    masked_linear(x, weight, bias=None, mask_in=None, mask_out=None, block_in=1, block_out=1,
                  *, grad_acc_in=None, grad_acc_out=None, sq_acc_in=None, sq_acc_out=None)
    ScoreArena(specs, device, stats=...)          flat masks / scores / statistics of a model
    Criterion(name, stats, fn), register_criterion, get_criterion, criterion_names
                                                   scoring rules by name or object (criteria.py)
    taylor_score, taylor2_score, fisher_score, magnitude_score, wanda_score, act_sq_accumulate_
    ema_update_(imp, score, ema)
    global_kth_smallest(tensors, k, ignore_zeros=True)
    prune_lowest_(arena, k)
    block_reduce(scores, block, op)               op in sum / mean / l2 / max
    repack(tensors, keep_rows, keep_cols)
    backends()                                     which implementation each op uses, and why
    set_backend(name)                              force a backend at run time (auto / torch / cpp /
                                                   triton / cuda); TSPRUNE_KERNELS_BACKEND is read
                                                   once, at import

Every kernel is a ``torch.library`` op in the ``tsprune`` namespace (``torch.ops.tsprune.*``, with
fake implementations): see ``_library.py`` and docs/KERNELS.md, "Ops and dispatch".
"""
from ._backend import backends, set_backend
from .arena import ScoreArena, StepResult
from .criteria import Criterion, criterion_names, get_criterion, register_criterion
from .ops.masked_linear import masked_linear
from .ops.repack import repack
from .ops.scores import (
    act_sq_accumulate_,
    block_reduce,
    ema_update_,
    fisher_score,
    magnitude_score,
    taylor2_score,
    taylor_score,
    wanda_score,
)
from .ops.select import global_kth_smallest, prune_lowest_

__all__ = [
    "Criterion",
    "ScoreArena",
    "StepResult",
    "act_sq_accumulate_",
    "backends",
    "block_reduce",
    "criterion_names",
    "ema_update_",
    "fisher_score",
    "get_criterion",
    "global_kth_smallest",
    "magnitude_score",
    "masked_linear",
    "prune_lowest_",
    "register_criterion",
    "repack",
    "set_backend",
    "taylor2_score",
    "taylor_score",
    "wanda_score",
]
__version__ = "0.1.0"
