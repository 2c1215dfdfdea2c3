"""Importance scores as plain tensor functions, block reduction, EMA and activation statistics.

Each is a ``tsprune::`` op (``_library.py``). The scores are a few fused torch ops on any device
(CompositeImplicitAutograd: differentiable, and torch.compile traces through them); block_reduce,
ema_update_ and act_sq_accumulate_ have Triton kernels on CUDA, and the streaming activation
statistic a C++ pass on CPU (no x**2 temporary)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _library  # noqa: F401  (defines the tsprune:: ops)
from ._checks import SIZE_MAX, as_int

_BLOCK_OPS = ("sum", "mean", "l2", "max")

def block_reduce(scores: Tensor, block: int, op: str = "sum") -> Tensor:
    """``[..., F] -> [..., F // block]``: reduce each run of ``block`` consecutive entries of the last
    dim with ``op`` in sum / mean / l2 (sqrt of the sum of squares) / max (of the raw values)."""
    if op not in _BLOCK_OPS:
        raise ValueError(f"block_reduce: op must be one of {', '.join(_BLOCK_OPS)}, got {op!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block_reduce: block must be a positive int, got {block!r}")
    as_int("block_reduce", "block", block, 1, SIZE_MAX)
    if scores.dim() < 1 or scores.shape[-1] % block:
        raise ValueError(
            f"block_reduce: last dim {scores.shape[-1] if scores.dim() else 0} of shape "
            f"{tuple(scores.shape)} is not divisible by block {block}"
        )
    return torch.ops.tsprune.block_reduce(scores, block, op)


def _same_shape(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name}: tensors on different devices: {a.device} vs {b.device}")


def taylor_score(grad: Tensor, mask: Tensor) -> Tensor:
    """First-order Taylor estimate of the loss change when a unit is removed: ``-g * m``."""
    _same_shape("taylor_score", grad, mask)
    return torch.ops.tsprune.taylor_score(grad, mask)


def taylor2_score(grad: Tensor, sq: Tensor) -> Tensor:
    """Second order with a diagonal Fisher: ``-(sum_i g_i) + 0.5 * sum_i g_i**2``."""
    _same_shape("taylor2_score", grad, sq)
    return torch.ops.tsprune.taylor2_score(grad, sq)


def fisher_score(sq: Tensor) -> Tensor:
    """``sum_i g_i**2`` (a copy)."""
    return torch.ops.tsprune.fisher_score(sq)


def magnitude_score(weight: Tensor, dim: int = 0, block: int = 1) -> Tensor:
    """L2 norm per output row (dim=0: units of mask_out) or per input column (dim=1: units of mask_in)
    of a [N, K] weight, over the ``block`` channels of each unit. fp32 for half inputs."""
    if weight.dim() != 2:
        raise ValueError(f"magnitude_score: weight must be 2-D, got shape {tuple(weight.shape)}")
    if dim not in (0, 1):
        raise ValueError(f"magnitude_score: dim must be 0 (rows) or 1 (columns), got {dim}")
    as_int("magnitude_score", "block", block, 1, SIZE_MAX)
    if weight.shape[dim] % block:
        raise ValueError(f"magnitude_score: {weight.shape[dim]} channels not divisible by block {block}")
    return torch.ops.tsprune.magnitude_score(weight, dim, block)


def wanda_score(act_sq: Tensor, weight: Tensor, block: int = 1) -> Tensor:
    """Activation-aware (Wanda) score per input unit: sum over its channels j of
    ``||X_j||_2 * ||W[:, j]||_2``; ``act_sq[j]`` is the streaming sum of x_j**2 (act_sq_accumulate_)."""
    if weight.dim() != 2 or act_sq.shape != (weight.shape[1],):
        raise ValueError(
            f"wanda_score: act_sq shape {tuple(act_sq.shape)} must be ({weight.shape[1]},) for weight "
            f"{tuple(weight.shape)}"
        )
    as_int("wanda_score", "block", block, 1, SIZE_MAX)
    if weight.shape[1] % block:
        raise ValueError(f"wanda_score: {weight.shape[1]} input channels not divisible by block {block}")
    return torch.ops.tsprune.wanda_score(act_sq, weight, block)


def act_sq_accumulate_(x: Tensor, acc: Tensor) -> Tensor:
    """``acc[j] += sum over all leading positions of x[..., j]**2`` in acc's dtype (fp32/fp64), in place."""
    if acc.dim() != 1 or x.shape[-1] != acc.shape[0]:
        raise ValueError(f"act_sq_accumulate_: x has {x.shape[-1]} channels, acc has shape {tuple(acc.shape)}")
    if acc.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"act_sq_accumulate_: acc must be float32 or float64, got {acc.dtype}")
    if x.device != acc.device:
        raise ValueError(f"act_sq_accumulate_: x on {x.device}, acc on {acc.device}")
    torch.ops.tsprune.act_sq_accumulate_(x.detach(), acc)
    return acc


def ema_update_(imp: Tensor, score: Tensor, ema: float) -> Tensor:
    """In place: ``imp = ema * score + (1 - ema) * imp``; ``ema`` in [0, 1]."""
    if not 0.0 <= float(ema) <= 1.0:
        raise ValueError(f"ema_update_: ema must be in [0, 1], got {ema}")
    _same_shape("ema_update_", imp, score)
    torch.ops.tsprune.ema_update_(imp, score, float(ema))
    return imp
