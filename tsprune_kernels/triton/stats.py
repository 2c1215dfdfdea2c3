"""Triton streaming statistics: block_reduce, act_sq_accumulate_, ema_update_.

Stage: scoring (magnitude / Wanda statistics during calibration, EMA in the arena step). Each is one
memory-bound pass, accumulating in fp32 (fp64 for fp64 data) whatever the input dtype; no temporary
the size of the input (no ``x**2``, no upcast copy). Semantics as in ``tsprune_kernels.torch_impl``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import torch_impl
from ._util import next_pow2

_OPS = {"sum": 0, "mean": 1, "l2": 2, "max": 3}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@triton.jit
def _block_reduce_kernel(x_ptr, out_ptr, n_out, block, OP: tl.constexpr, ACC64: tl.constexpr,
                         BO: tl.constexpr, BB: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BO + tl.arange(0, BO)
    o_ok = o < n_out
    acc_t = tl.float64 if ACC64 else tl.float32
    if OP == 3:
        acc = tl.full((BO,), float("-inf"), acc_t)
    else:
        acc = tl.zeros((BO,), acc_t)
    rb = tl.arange(0, BB)
    for b0 in range(0, block, BB):
        b = b0 + rb
        m = o_ok[:, None] & (b < block)[None, :]
        ptrs = x_ptr + o[:, None] * block + b[None, :]
        if OP == 3:
            v = tl.load(ptrs, mask=m, other=float("-inf")).to(acc_t)
            acc = tl.maximum(acc, tl.max(v, 1))
        else:
            v = tl.load(ptrs, mask=m, other=0.0).to(acc_t)
            if OP == 2:
                v = v * v
            acc += tl.sum(v, 1)
    if OP == 1:
        acc = acc / block
    if OP == 2:
        acc = tl.sqrt(acc)
    tl.store(out_ptr + o, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


def block_reduce(scores: Tensor, block: int, op: str) -> Tensor:
    if scores.dtype not in _FLOATS or scores.numel() == 0:
        return torch_impl.block_reduce(scores, block, op)
    x = scores.contiguous()
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // block,), dtype=x.dtype, device=x.device)
    n_out = out.numel()
    BB = min(next_pow2(block), 128)
    BO = max(16, 2048 // BB)
    _block_reduce_kernel[(triton.cdiv(n_out, BO),)](
        x, out, n_out, block, OP=_OPS[op], ACC64=x.dtype == torch.float64, BO=BO, BB=BB)
    return out


@triton.jit
def _act_sq_kernel(x_ptr, acc_ptr, T, C, sxt, sxc, ROWS: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr):
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    c_ok = c < C
    r0 = tl.program_id(1) * ROWS
    part = tl.zeros((BC,), acc_ptr.dtype.element_ty)
    for t0 in range(r0, tl.minimum(r0 + ROWS, T), BT):
        t = t0 + tl.arange(0, BT)
        m = (t < T)[:, None] & c_ok[None, :]
        v = tl.load(x_ptr + t.to(tl.int64)[:, None] * sxt + c[None, :] * sxc, mask=m, other=0.0)
        v = v.to(acc_ptr.dtype.element_ty)
        part += tl.sum(v * v, 0)
    tl.atomic_add(acc_ptr + c, part, mask=c_ok, sem="relaxed")


def act_sq_accumulate_(x: Tensor, acc: Tensor) -> Tensor:
    """acc[j] += sum over all leading positions of x[..., j]**2, in acc's dtype, in place."""
    if x.dtype not in _FLOATS or not acc.is_contiguous() or x.numel() == 0:
        return torch_impl.act_sq_accumulate_(x, acc)
    x2 = x.reshape(-1, x.shape[-1])  # a view whenever the leading dims allow it
    T, C = x2.shape
    BC, BT, ROWS = 64, 32, 512
    _act_sq_kernel[(triton.cdiv(C, BC), triton.cdiv(T, ROWS))](
        x2, acc, T, C, x2.stride(0), x2.stride(1), ROWS=ROWS, BT=BT, BC=BC)
    return acc


@triton.jit
def _ema_kernel(imp_ptr, s_ptr, n, keep, ema, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = o < n
    imp = tl.load(imp_ptr + o, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + o, mask=ok, other=0.0).to(imp_ptr.dtype.element_ty).to(tl.float32)
    out = imp * keep + s * ema
    tl.store(imp_ptr + o, out.to(imp_ptr.dtype.element_ty), mask=ok)


def ema_update_(imp: Tensor, score: Tensor, ema: float) -> Tensor:
    """In place: imp = ema * score + (1 - ema) * imp (fp64 importance: the torch path, since
    Triton scalars are fp32)."""
    if imp.dtype not in _FLOATS[:1] + _FLOATS[2:] or not (imp.is_contiguous() and score.is_contiguous()) or imp.numel() == 0:
        return torch_impl.ema_update_(imp, score, ema)
    n = imp.numel()
    BLOCK = 1024
    _ema_kernel[(triton.cdiv(n, BLOCK),)](imp, score, n, 1.0 - float(ema), float(ema), BLOCK=BLOCK)
    return imp
