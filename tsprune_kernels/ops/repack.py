"""repack: gather kept rows and columns of many tensors into new contiguous tensors, in one call."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

import torch

from .. import _backend, _library  # noqa: F401  (_library defines the tsprune:: ops)


def _check_index(i: int, what: str, idx: Optional[Tensor], size: int, t: Tensor, ranges: bool) -> None:
    if idx is None:
        return
    if not isinstance(idx, Tensor) or idx.dtype != torch.long or idx.dim() != 1:
        raise TypeError(f"repack: keep_{what}[{i}] must be a 1-D LongTensor or None")
    if idx.device != t.device:
        raise ValueError(f"repack: keep_{what}[{i}] is on {idx.device} but tensor {i} is on {t.device}")
    if ranges and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise IndexError(
            f"repack: keep_{what}[{i}] has index {int(idx.min()) if int(idx.min()) < 0 else int(idx.max())} "
            f"out of range for size {size} (tensor {i} of shape {tuple(t.shape)})"
        )


def repack(
    tensors: Sequence[Tensor],
    keep_rows: Sequence[Optional[Tensor]],
    keep_cols: Sequence[Optional[Tensor]],
) -> list[Tensor]:
    """For each i a new contiguous tensor of rows ``keep_rows[i]`` (dim 0) and columns
    ``keep_cols[i]`` (dim 1) of ``tensors[i]``; None keeps all. 1-D tensors take rows only; dims
    past the second are kept whole. Any dtype; never aliases its input."""
    tensors = list(tensors)
    keep_rows, keep_cols = list(keep_rows), list(keep_cols)
    if not (len(tensors) == len(keep_rows) == len(keep_cols)):
        raise ValueError(
            f"repack: {len(tensors)} tensors but {len(keep_rows)} keep_rows and {len(keep_cols)} keep_cols"
        )
    if not tensors:
        return []
    cpu = all(t.device.type == "cpu" for t in tensors)
    # The C++ kernel checks index ranges itself in its pass; checking here too would cost two
    # reductions (and, on other backends, host syncs) per index tensor.
    use_cpp = cpu and _backend.choose("repack", "cpu").backend == "cpp"
    for i, (t, r, c) in enumerate(zip(tensors, keep_rows, keep_cols)):
        if t.dim() == 0:
            raise ValueError(f"repack: tensor {i} is 0-d")
        if t.dim() == 1 and c is not None:
            raise ValueError(f"repack: tensor {i} is 1-D (shape {tuple(t.shape)}) but keep_cols[{i}] is given")
        _check_index(i, "rows", r, t.shape[0], t, not use_cpp)
        if c is not None:
            _check_index(i, "cols", c, t.shape[1], t, not use_cpp)
    try:
        return list(torch.ops.tsprune.repack([t.detach() for t in tensors], keep_rows, keep_cols))
    except RuntimeError as e:
        msg = str(e).split("\nException raised from")[0]
        if "out of range" in msg:
            raise IndexError(f"repack: {msg}") from None
        raise
