"""Global selection over many score tensors: k-th smallest |value| and pruning of the k lowest."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _library  # noqa: F401  (defines the tsprune:: ops)
from ._checks import as_int


def global_kth_smallest(tensors: Sequence[Tensor] | Tensor, k: int, ignore_zeros: bool = True) -> Tensor:
    """The k-th smallest absolute value (1-based, torch.kthvalue semantics) over every element of
    ``tensors``, without concatenating them; exact zeros are skipped when ``ignore_zeros``.

    Returns a 0-d tensor (float32 for half inputs, else the input dtype) on the inputs' device.
    Raises ValueError when k is outside [1, number of candidates] or a value is NaN / Inf."""
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    if not tensors:
        raise ValueError("global_kth_smallest: empty list of tensors")
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) != 1 or not tensors[0].is_floating_point():
        raise TypeError(f"global_kth_smallest: tensors must share one float dtype, got {sorted(map(str, dtypes))}")
    if len(devices) != 1:
        raise ValueError(f"global_kth_smallest: tensors on several devices: {sorted(map(str, devices))}")
    total = sum(t.numel() for t in tensors)
    k = as_int("global_kth_smallest", "k", k, -(2**64), None)  # TypeError for a non-int
    if not 1 <= k <= total:  # the backend then checks k against the count of candidates
        raise ValueError(f"global_kth_smallest: k={k} is out of range [1, {total}] (number of values)")
    try:
        return torch.ops.tsprune.global_kth_smallest([t.detach() for t in tensors], k, ignore_zeros)
    except RuntimeError as e:  # the C++ kernel's TORCH_CHECK messages -> the documented ValueError
        msg = str(e).split("\nException raised from")[0]
        if "tsprune: kth_smallest_abs" not in msg:
            raise
        raise ValueError(f"global_kth_smallest: {msg}") from None


def prune_lowest_(arena_or_mask, k: int, imp: Tensor | None = None) -> int:
    """Prune in place: for the ``k`` live units (mask != 0) with the smallest nonzero |score| (ties:
    lower flat index first), and for every live unit whose score is exactly 0, set mask and score
    to 0. Returns how many units were pruned.

    ``prune_lowest_(arena, k)`` works on a ScoreArena's flat mask / importance buffers;
    ``prune_lowest_(mask, k, imp=scores)`` on any pair of equally shaped 1-D float32 tensors."""
    if imp is None:
        mask, imp = arena_or_mask.mask, arena_or_mask.imp
    else:
        mask = arena_or_mask
    if mask.shape != imp.shape or mask.dim() != 1:
        raise ValueError(f"prune_lowest_: mask {tuple(mask.shape)} and scores {tuple(imp.shape)} must be equal 1-D")
    k = as_int("prune_lowest_", "k", k, 0, None)  # any k >= 0; more than the live units prunes them all
    if not bool(torch.isfinite(imp).all()):
        raise ValueError("prune_lowest_: scores contain NaN or Inf")
    return _prune_lowest_checked_(mask, imp, min(k, mask.numel()))


def _prune_lowest_checked_(mask: Tensor, imp: Tensor, k: int) -> int:
    """prune_lowest_ on inputs already validated (equal 1-D shapes, k >= 0, finite scores);
    ScoreArena.step calls it after its own checks so the scores are not scanned twice."""
    k = min(int(k), mask.numel())  # the kernels take int64
    return int(torch.ops.tsprune.prune_lowest_(mask, imp, k))
