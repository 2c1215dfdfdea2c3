"""Triton implementations of the tsprune_kernels ops (CUDA tensors; CPU tensors only under the
Triton interpreter, ``TRITON_INTERPRET=1``, for tests).

Imported lazily by ``_backend.triton_impl()`` the first time an op picks the ``triton`` backend,
so a machine without Triton never imports it. One file per op family:

    masked_linear.py   forward / backward of masked_linear with the mask gradients fused
    select.py          radix select over many tensors, prune_lowest_ (the arena step)
    stats.py           block_reduce, act_sq_accumulate_, ema_update_

Every function here takes already-validated arguments (ops/*.py validate) and has the semantics
of the same-named function in ``tsprune_kernels.torch_impl`` (the torch backend). See docs/KERNELS.md, "Triton (CUDA)".
"""
import contextlib
import functools

import torch
import triton  # noqa: F401  (fails here, inside _backend's guard, when Triton is missing)

from . import masked_linear as _ml
from . import select as _select
from . import stats as _stats


def _device_guarded(fn):
    """Run ``fn`` with the device of its first tensor argument current: Triton launches on the
    current CUDA device, so a call with tensors on cuda:1 while cuda:0 is current must switch."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in args:
            t = a[0] if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor) else a
            if isinstance(t, torch.Tensor):
                ctx = torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
                with ctx:
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


masked_linear_fwd = _device_guarded(_ml.masked_linear_fwd)
masked_linear_bwd = _device_guarded(_ml.masked_linear_bwd)
kth_smallest_abs = _device_guarded(_select.kth_smallest_abs)
prune_lowest_ = _device_guarded(_select.prune_lowest_)
act_sq_accumulate_ = _device_guarded(_stats.act_sq_accumulate_)
block_reduce = _device_guarded(_stats.block_reduce)
ema_update_ = _device_guarded(_stats.ema_update_)

__all__ = [
    "act_sq_accumulate_",
    "block_reduce",
    "ema_update_",
    "kth_smallest_abs",
    "masked_linear_bwd",
    "masked_linear_fwd",
    "prune_lowest_",
]
