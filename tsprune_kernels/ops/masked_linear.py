"""masked_linear: ``((x * expand(mask_in)) @ weight.T + bias) * expand(mask_out)`` with fused mask gradients.

Two torch ops (``tsprune::masked_linear_fwd`` / ``tsprune::masked_linear_bwd``, defined with their
fakes and kernels in ``_library.py``, so models using them run under torch.compile) joined by an
autograd.Function.

Saved for backward (through ``ctx.save_for_backward`` only): x, weight, bias, the output y, mask_in,
mask_out, and y_pre_zero. The output is saved instead of the pre-mask activation: where a mask entry is
nonzero the mask gradient is recovered from y (see docs/KERNELS.md). y_pre_zero is the pre-mask
activation of the ZERO units of mask_out only ([T, |Z| * block_out]; the C++ backend keeps it when the
mask_out gradient will be needed, its forward GEMM computes those columns anyway), so their gradient
needs no recompute; it is [T, 0] on the other backends and when mask_out has no zero entry.
Gradient / squared-gradient accumulators (e.g. ScoreArena views) are *not* activations: they are
held on ctx as references and updated in place by the backward op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _library  # noqa: F401  (defines the tsprune:: ops)
from ._checks import SIZE_MAX, as_int

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# The two ops (schemas, fakes and kernels: _library.py), as callables.
masked_linear_fwd = torch.ops.tsprune.masked_linear_fwd.default
masked_linear_bwd = torch.ops.tsprune.masked_linear_bwd.default


# -- autograd ------------------------------------------------------------------------------------

class _MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask_in, mask_out, block_in, block_out, accs, grad_on):
        lead = x.shape[:-1]
        x2 = x.reshape(math.prod(lead), x.shape[-1])  # explicit: -1 is ambiguous when K == 0
        # Keep y_pre of mask_out's zero units only if a backward will want the mask_out gradient
        # (grad mode on at the call, something differentiable, and a .grad or an accumulator).
        need = ctx.needs_input_grad
        # Not while torch.compile traces: the kept width is data-dependent, which would break the
        # graph at every masked Linear; the backward then recomputes those columns (exact too).
        keep = (grad_on and mask_out is not None and any(need) and not torch.compiler.is_compiling()
                and (need[4] or accs[1] is not None or accs[3] is not None))
        y2, ypz = masked_linear_fwd(x2, weight, bias, mask_in, mask_out, block_in, block_out, keep)
        ctx.save_for_backward(x2, weight, bias, y2, mask_in, mask_out, ypz)
        # ypz is also returned (non-differentiable; the public wrapper drops it): under
        # torch.compile its data-dependent width must be an output of the traced forward.
        ctx.mark_non_differentiable(ypz)
        ctx.set_materialize_grads(False)  # no [T, |Z|] zeros for ypz's (never used) gradient
        ctx.blocks = (block_in, block_out)
        # tokens per sample (x's first dim is the sample dim); 0 for x of shape [S, 0, K]
        ctx.tokens_per_sample = x2.shape[0] // lead[0] if len(lead) >= 1 and lead[0] > 0 else 0
        ctx.accs = accs
        ctx.x_shape = x.shape
        return y2.view(*lead, weight.shape[0]), ypz

    @staticmethod
    def backward(ctx, gy, _gypz):
        if gy is None:  # only reachable through y; kept for safety without materialized grads
            return (None,) * 9
        x2, weight, bias, y2, mask_in, mask_out, ypz = ctx.saved_tensors
        acc_in, acc_out, sq_in, sq_out = ctx.accs
        need = ctx.needs_input_grad
        gy2 = gy.reshape(x2.shape[0], gy.shape[-1])
        if gy2.dtype != x2.dtype:
            gy2 = gy2.to(x2.dtype)
        # A mask with an accumulator sends its gradient there only (its .grad stays None).
        need_mi = need[3] and mask_in is not None and acc_in is None
        need_mo = need[4] and mask_out is not None and acc_out is None
        dx, dw, db, dmi, dmo = masked_linear_bwd(
            gy2, x2, y2, weight, bias, mask_in, mask_out, ctx.blocks[0], ctx.blocks[1],
            ctx.tokens_per_sample, [need[0], need[1], need[2] and bias is not None, need_mi, need_mo],
            acc_in, acc_out, sq_in, sq_out, ypz,
        )
        return (
            dx.view(ctx.x_shape) if need[0] else None,
            dw if need[1] else None,
            db if need[2] and bias is not None else None,
            dmi.to(mask_in.dtype) if need_mi else None,
            dmo.to(mask_out.dtype) if need_mo else None,
            None, None, None, None,
        )


# -- validation + public entry -------------------------------------------------------------------

def _check_mask(name: str, m: Optional[Tensor], features: int, block: int, x: Tensor) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"masked_linear: block for {name} must be a positive int, got {block!r}")
    as_int("masked_linear", f"block for {name}", block, 1, SIZE_MAX)
    if features % block:
        raise ValueError(
            f"masked_linear: {features} {'input' if name == 'mask_in' else 'output'} features are not "
            f"divisible by {name} block {block}"
        )
    if m is None:
        return
    if m.dim() != 1 or m.shape[0] * block != features:
        raise ValueError(
            f"masked_linear: {name} has shape {tuple(m.shape)}; expected ({features // block},) "
            f"= {features} features / block {block}"
        )
    if not m.is_floating_point():
        raise TypeError(f"masked_linear: {name} must be a float tensor, got {m.dtype}")
    if m.device != x.device:
        raise ValueError(f"masked_linear: {name} is on {m.device} but x is on {x.device}")


def _check_acc(name: str, a: Optional[Tensor], mask: Optional[Tensor], units: int, x: Tensor) -> None:
    if a is None:
        return
    if mask is None:
        raise ValueError(f"masked_linear: {name} given without the mask it accumulates for")
    if a.dim() != 1 or a.shape[0] != units:
        raise ValueError(f"masked_linear: {name} has shape {tuple(a.shape)}; expected ({units},)")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"masked_linear: accumulator {name} must be float32 or float64, got {a.dtype}")
    if a.stride(0) != 1:
        raise ValueError(f"masked_linear: accumulator {name} must have stride 1, got {a.stride(0)}")
    if a.device != x.device:
        raise ValueError(f"masked_linear: {name} is on {a.device} but x is on {x.device}")


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    mask_in: Optional[Tensor] = None,
    mask_out: Optional[Tensor] = None,
    block_in: int = 1,
    block_out: int = 1,
    *,
    grad_acc_in: Optional[Tensor] = None,
    grad_acc_out: Optional[Tensor] = None,
    sq_acc_in: Optional[Tensor] = None,
    sq_acc_out: Optional[Tensor] = None,
) -> Tensor:
    """``((x * expand(mask_in)) @ weight.T + bias) * expand(mask_out)``.

    Shapes: x ``[..., K]`` (leading dims: the first is the sample dim), weight ``[N, K]``, bias ``[N]``,
    mask_in ``[K // block_in]``, mask_out ``[N // block_out]``; ``expand`` repeats each mask entry over
    ``block`` consecutive channels. x, weight and bias share one float dtype (fp32 / fp64 / fp16 /
    bf16) and device; masks are any float dtype. Returns ``[..., N]`` in x's dtype.

    Differentiable w.r.t. x, weight, bias and both masks, whichever require grad; a frozen weight
    costs no weight gradient. Mask gradients are accumulated in fp32 (fp64 for fp64 inputs) and are
    exact for any mask values, including entries equal to 0.

    Accumulators (keyword-only, 1-D float32/float64 of the mask's length, stride 1; normally
    ScoreArena views): in backward, ``grad_acc_*`` += the mask gradient and ``sq_acc_*`` +=
    ``sum_i g_i**2``, g_i being sample i's gradient (i over x's first dim; the sum over its other
    leading dims). A mask with an accumulator sends its gradient there only (its ``.grad`` stays
    None). Backward must reach this op: x, weight or bias needs grad, or a mask has
    ``requires_grad`` (ScoreArena's views do, for exactly that reason).

    Empty dimensions (no samples, no tokens per sample, K = 0 or N = 0) work in forward and
    backward on every backend and give what F.linear gives (zeros / empty gradients; the mask
    gradients of an empty batch are 0 and leave accumulators unchanged).

    Documented behaviour: NaN / Inf in x or in the incoming gradient propagate into outputs and
    accumulators (ScoreArena.step raises on them); non-contiguous x / weight are copied.
    """
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("masked_linear: x and weight must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"masked_linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"masked_linear: x has {x.shape[-1] if x.dim() else 0} features (shape {tuple(x.shape)}) "
            f"but weight expects {weight.shape[1]} (shape {tuple(weight.shape)})"
        )
    if x.dtype not in _FLOATS:
        raise TypeError(f"masked_linear: x must be float32/float64/float16/bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"masked_linear: dtype mismatch: x {x.dtype}, weight {weight.dtype}"
            + (f", bias {bias.dtype}" if bias is not None else "")
        )
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"masked_linear: x is on {x.device} but weight/bias are on {weight.device}")
    n_out, n_in = weight.shape
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n_out):
        raise ValueError(f"masked_linear: bias has shape {tuple(bias.shape)}; expected ({n_out},)")
    _check_mask("mask_in", mask_in, n_in, block_in, x)
    _check_mask("mask_out", mask_out, n_out, block_out, x)
    _check_acc("grad_acc_in", grad_acc_in, mask_in, n_in // block_in, x)
    _check_acc("sq_acc_in", sq_acc_in, mask_in, n_in // block_in, x)
    _check_acc("grad_acc_out", grad_acc_out, mask_out, n_out // block_out, x)
    _check_acc("sq_acc_out", sq_acc_out, mask_out, n_out // block_out, x)
    if x.dim() == 1:
        return masked_linear(x.unsqueeze(0), weight, bias, mask_in, mask_out, block_in, block_out,
                             grad_acc_in=grad_acc_in, grad_acc_out=grad_acc_out,
                             sq_acc_in=sq_acc_in, sq_acc_out=sq_acc_out).squeeze(0)
    accs = (grad_acc_in, grad_acc_out, sq_acc_in, sq_acc_out)
    y, _ = _MaskedLinear.apply(x, weight, bias, mask_in, mask_out, block_in, block_out, accs,
                               torch.is_grad_enabled())
    return y
