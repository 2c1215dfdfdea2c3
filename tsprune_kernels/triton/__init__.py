"""Triton implementations of the tsprune_kernels ops (CUDA tensors; CPU tensors only under the
Triton interpreter, ``TRITON_INTERPRET=1``, for tests).

Imported lazily by ``_backend.triton_impl()`` the first time an op picks the ``triton`` backend,
so a machine without Triton never imports it. One file per op family:

    masked_linear.py   forward / backward of masked_linear with the mask gradients fused
    select.py          radix select over many tensors, prune_lowest_ (the arena step)
    stats.py           block_reduce, act_sq_accumulate_, ema_update_

Every function here takes already-validated arguments (ops/*.py validate) and has the semantics
of the same-named function in ``tsprune_kernels.reference``. See docs/KERNELS.md, "Triton (CUDA)".
"""
import triton  # noqa: F401  (fails here, inside _backend's guard, when Triton is missing)

from .masked_linear import masked_linear_bwd, masked_linear_fwd
from .select import kth_smallest_abs, prune_lowest_
from .stats import act_sq_accumulate_, block_reduce, ema_update_

__all__ = [
    "act_sq_accumulate_",
    "block_reduce",
    "ema_update_",
    "kth_smallest_abs",
    "masked_linear_bwd",
    "masked_linear_fwd",
    "prune_lowest_",
]
