"""Triton masked_linear: masks applied inside the GEMMs, mask gradients fused into the kernels.

Stage: calibration forward / backward (docs/KERNELS.md, "Triton (CUDA)"). Receives the 2-D operands
of ``tsprune::masked_linear_fwd`` / ``_bwd`` (ops/masked_linear.py); hands back y, or (dx, dweight,
dbias, dmask_in, dmask_out) and adds into the accumulators in place. Touches nothing else.

Two paths (``path()``; ``TSPRUNE_TRITON_MASKED_LINEAR`` = auto | fused | fold). ``fused`` (bf16 /
fp16, fp32 with TF32), kernels with T tokens, K inputs, N outputs, unit = channel // block:

    _fwd_kernel      y = ((x * m_in) @ W.T + b) * m_out. m_in is applied to each loaded x tile (the
                     GEMM prologue), bias and m_out in the epilogue. No temporary.
    _dx_kernel       dxm = (gy * m_out) @ W (m_out applied to each loaded gy tile); epilogue stores
                     dx = dxm * m_in and reduces dxm * x per input unit (and per sample for taylor2).
                     It also reduces gy * y / m_out per output unit: the gy tile of reduction step s
                     is in registers anyway, and the program with pid_c == s % (programs along C)
                     loads the matching y tile, so y is read exactly once and the work is spread.
    _ratio_kernel    the same output-side reduction alone, when no dx / input-side work exists.
    _zero_kernel     exact gradients of units whose mask is 0 / tiny / not finite (where y / m is
                     undefined): y_pre of those columns only, by a GEMM over a compacted list of
                     their channels (``_compact_kernel``; count read on the device, idle programs
                     exit, no host sync). Costs |Z| / N of one forward GEMM.
    _finalize_kernel per unit: acc += g, sq += sum_i g_i**2 (from the per-sample partials),
                     dmask = g.

``fold`` (fp32 without TF32, where Triton's dot runs on FMA units and cuBLAS SGEMM is faster): the
masks folded into a weight copy (``_fold_kernel``), cuBLAS GEMMs, ``_ratio_kernel`` on both sides
(gy * y / m_out, dx * x / m_in) and ``_zero_kernel`` for the zero units of both sides.

Reductions go to a zeroed fp32 scratch buffer by relaxed atomics: per unit totals [U], or for
taylor2 the per-sample partials [S, U] (S = samples = T // tokens_per_sample) that
``_finalize_kernel`` sums and squares. When a sample is a single token and a unit a single channel,
squares are summed in registers (no [S, U] buffer). dweight / dbias (fine-tuning through masks,
never in calibration) use the exact identities dW = m_out * (gy.T @ x) * m_in and
db = m_out * gy.sum(0): weight-sized temporaries only. fp64 inputs take the torch backend (torch_impl).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import torch_impl
from ._util import cfg, configs, dot_precision, interpreting, upcast_dot

# |m| below this (or m not finite): the unit's output-side gradient is recomputed, not y / m.
# One table for every backend (torch_impl.zero_threshold; the C++ kernel has the same values).
zero_threshold = torch_impl.zero_threshold


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _mask_ok(m, th):
    """Units whose gradient can be recovered as (gy * y) / m: finite and |m| >= th."""
    return ((m - m) == 0) & (tl.abs(m) >= th)


@triton.jit
def _unit_reduce(prod, rows, units, col_ok, row0, T, tps, U, tot_ptr, sq_ptr, part_ptr,
                 SQ: tl.constexpr, BT: tl.constexpr):
    """Add the [BT, BC] fp32 tile ``prod`` (zero outside the valid rows / columns) into the unit
    totals; SQ == 1: also its squares (a row is a sample and a column a unit); SQ == 2: into the
    per-sample partials part[s, unit] instead (rows ``row0 ..`` belong to samples row // tps; the
    totals are their sums, formed by _finalize_kernel). Relaxed atomics: only the sums matter."""
    if SQ == 2:
        row_end = tl.minimum(row0 + BT, T)
        s_lo = row0 // tps
        s_hi = (row_end - 1) // tps
        rs = rows // tps
        for s in range(s_lo, s_hi + 1):
            part = tl.sum(tl.where((rs == s)[:, None], prod, 0.0), 0)
            tl.atomic_add(part_ptr + s * U + units, part, mask=col_ok, sem="relaxed")
    else:
        tl.atomic_add(tot_ptr + units, tl.sum(prod, 0), mask=col_ok, sem="relaxed")
        if SQ == 1:
            tl.atomic_add(sq_ptr + units, tl.sum(prod * prod, 0), mask=col_ok, sem="relaxed")


@triton.jit
def _round_bf16(v):
    """fp32 -> the nearest bfloat16 value (ties to even), kept in fp32. Only under the interpreter
    (UPCAST), whose own fp32 -> bf16 cast truncates: with this the stored values match a GPU's."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _grouped(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP row tiles at a time for L2 reuse."""
    width = GROUP * n_cols
    g = pid // width
    first = g * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

_FWD_CONFIGS = configs(
    [
        cfg(8, 3, BT=128, BC=128, BR=64, GROUP=8),
        cfg(4, 4, BT=128, BC=64, BR=64, GROUP=8),
        cfg(4, 4, BT=64, BC=128, BR=64, GROUP=8),
        cfg(8, 3, BT=128, BC=256, BR=64, GROUP=8),
    ],
    cfg(4, 1, BT=32, BC=32, BR=32, GROUP=4),
)


@triton.autotune(configs=_FWD_CONFIGS, key=["N", "K", "HAS_BIAS", "HAS_MIN", "HAS_MOUT", "PREC"])
@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, mi_ptr, mo_ptr, y_ptr,
    T, N, K, bi, bo,
    sxt, sxk, swn, swk, syt, syn, smi, smo,
    HAS_BIAS: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, GROUP: tl.constexpr,
):
    pid_t, pid_c = _grouped(tl.program_id(0), tl.cdiv(T, BT), tl.cdiv(N, BC), GROUP)
    rt = pid_t * BT + tl.arange(0, BT)
    rc = pid_c * BC + tl.arange(0, BC)
    rr = tl.arange(0, BR)
    t_ok = rt < T
    c_ok = rc < N
    x_rows = x_ptr + rt.to(tl.int64)[:, None] * sxt
    w_cols = w_ptr + rc.to(tl.int64)[None, :] * swn
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for k0 in range(0, K, BR):
        kk = k0 + rr
        k_ok = kk < K
        a = tl.load(x_rows + kk[None, :] * sxk, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_MIN:  # prologue: the input mask on the loaded x tile
            mi = tl.load(mi_ptr + (kk // bi) * smi, mask=k_ok, other=0.0).to(tl.float32)
            if UPCAST:  # (the interpreter's bf16 rounding truncates: stay fp32 there)
                a = a.to(tl.float32) * mi[None, :]
            else:  # in x's dtype, one rounding, like the reference's x * m.to(x.dtype)
                a = a * mi.to(x_ptr.dtype.element_ty)[None, :]
        w = tl.load(w_cols + kk[:, None] * swk, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_MOUT:  # epilogue: the output mask
        acc *= tl.load(mo_ptr + (rc // bo) * smo, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if UPCAST:
        acc = _round_bf16(acc)
    y_ptrs = y_ptr + rt.to(tl.int64)[:, None] * syt + rc[None, :] * syn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])


# ---------------------------------------------------------------------------------------------
# backward: dx + input-side reductions (+ output-side reductions)
# ---------------------------------------------------------------------------------------------

_BWD_CONFIGS = configs(
    [
        cfg(8, 3, BT=128, BC=128, BR=64, GROUP=8),
        cfg(4, 4, BT=128, BC=64, BR=64, GROUP=8),
        cfg(4, 4, BT=64, BC=128, BR=64, GROUP=8),
        cfg(4, 3, BT=64, BC=64, BR=32, GROUP=8),  # small layers; fp32 without tensor cores
    ],
    cfg(4, 1, BT=32, BC=32, BR=32, GROUP=4),
)

_SCRATCH = ["tot_in", "sq_in", "part_in", "tot_out", "sq_out", "part_out"]


@triton.autotune(
    configs=_BWD_CONFIGS,
    key=["N", "K", "NEED_DX", "DO_IN", "DO_OUT", "SQ_IN", "SQ_OUT", "HAS_MIN", "HAS_MOUT", "PREC"],
    reset_to_zero=_SCRATCH,
)
@triton.jit
def _dx_kernel(
    gy_ptr, w_ptr, x_ptr, y_ptr, mi_ptr, mo_ptr, dx_ptr,
    tot_in, sq_in, part_in, tot_out, sq_out, part_out,
    T, N, K, bi, bo, tps, Ui, Uo, th,
    sgt, sgn, swn, swk, sxt, sxk, syt, syn, sdt, sdk, smi, smo,
    NEED_DX: tl.constexpr, DO_IN: tl.constexpr, DO_OUT: tl.constexpr,
    SQ_IN: tl.constexpr, SQ_OUT: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, GROUP: tl.constexpr,
):
    n_c = tl.cdiv(K, BC)
    pid_t, pid_c = _grouped(tl.program_id(0), tl.cdiv(T, BT), n_c, GROUP)
    row0 = pid_t * BT
    rt = row0 + tl.arange(0, BT)
    rc = pid_c * BC + tl.arange(0, BC)
    rr = tl.arange(0, BR)
    t_ok = rt < T
    c_ok = rc < K
    rt64 = rt.to(tl.int64)
    g_rows = gy_ptr + rt64[:, None] * sgt
    w_cols = w_ptr + rc.to(tl.int64)[None, :] * swk
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for n0 in range(0, N, BR):
        nn = n0 + rr
        n_ok = nn < N
        tn_ok = t_ok[:, None] & n_ok[None, :]
        g = tl.load(g_rows + nn[None, :] * sgn, mask=tn_ok, other=0.0)
        if HAS_MOUT:  # prologue: the output mask on the loaded gy tile (go = dL/dy_pre)
            mo = tl.load(mo_ptr + (nn // bo) * smo, mask=n_ok, other=0.0).to(tl.float32)
            if UPCAST:
                go = g.to(tl.float32) * mo[None, :]
            else:
                go = g * mo.to(gy_ptr.dtype.element_ty)[None, :]
        else:
            go = g
        w = tl.load(w_cols + nn.to(tl.int64)[:, None] * swn, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            go = go.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(go, w, acc, input_precision=PREC)
        if DO_OUT:
            # sum_t gy * y_pre = sum_t gy * y / m_out, for the step this program owns
            if (n0 // BR) % n_c == pid_c:
                yv = tl.load(y_ptr + rt64[:, None] * syt + nn[None, :] * syn, mask=tn_ok, other=0.0)
                ok = _mask_ok(mo, th)
                inv = tl.where(ok, 1.0 / tl.where(ok, mo, 1.0), 0.0)
                prod = tl.where(ok[None, :], g.to(tl.float32) * yv.to(tl.float32) * inv[None, :], 0.0)
                _unit_reduce(prod, rt, nn // bo, n_ok, row0, T, tps, Uo, tot_out, sq_out, part_out,
                             SQ_OUT, BT)
    # epilogue: dx = dxm * m_in, and sum_t dxm * x per input unit
    tc_ok = t_ok[:, None] & c_ok[None, :]
    if NEED_DX:
        dx = acc
        if HAS_MIN:
            mi = tl.load(mi_ptr + (rc // bi) * smi, mask=c_ok, other=0.0).to(tl.float32)
            dx = acc * mi[None, :]
        if UPCAST:
            dx = _round_bf16(dx)
        tl.store(dx_ptr + rt64[:, None] * sdt + rc[None, :] * sdk, dx.to(dx_ptr.dtype.element_ty), mask=tc_ok)
    if DO_IN:
        xv = tl.load(x_ptr + rt64[:, None] * sxt + rc[None, :] * sxk, mask=tc_ok, other=0.0)
        prod = acc * xv.to(tl.float32)
        _unit_reduce(prod, rt, rc // bi, c_ok, row0, T, tps, Ui, tot_in, sq_in, part_in, SQ_IN, BT)


# ---------------------------------------------------------------------------------------------
# backward: a streaming sum_t g * v / m per unit (output side without dx work: g = gy, v = y,
# m = mask_out; fold path input side: g = dx, v = x, m = mask_in)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _ratio_kernel(
    g_ptr, v_ptr, m_ptr, tot, sqt, part,
    T, C, blk, tps, U, th, sgt, sgc, svt, svc, sm,
    SQ: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    row0 = tl.program_id(0) * BT
    rt = row0 + tl.arange(0, BT)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    t_ok = rt < T
    c_ok = rc < C
    m2 = t_ok[:, None] & c_ok[None, :]
    rt64 = rt.to(tl.int64)
    g = tl.load(g_ptr + rt64[:, None] * sgt + rc[None, :] * sgc, mask=m2, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + rt64[:, None] * svt + rc[None, :] * svc, mask=m2, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + (rc // blk) * sm, mask=c_ok, other=0.0).to(tl.float32)
    ok = _mask_ok(m, th)
    inv = tl.where(ok, 1.0 / tl.where(ok, m, 1.0), 0.0)
    prod = tl.where(ok[None, :], g * v * inv[None, :], 0.0)
    _unit_reduce(prod, rt, rc // blk, c_ok, row0, T, tps, U, tot, sqt, part, SQ, BT)


# ---------------------------------------------------------------------------------------------
# backward: exact gradients of zero-mask output units
# ---------------------------------------------------------------------------------------------

@triton.jit
def _compact_kernel(mo_ptr, smo, U, th, zunits_ptr, nz_ptr, BLOCK: tl.constexpr):
    """zunits[0:nz] = the output units whose mask fails _mask_ok, in order; nz on the device."""
    base = tl.program_id(0) * 0
    for u0 in range(0, U, BLOCK):
        u = u0 + tl.arange(0, BLOCK)
        ok = u < U
        m = tl.load(mo_ptr + u * smo, mask=ok, other=1.0).to(tl.float32)
        bad = ok & ~_mask_ok(m, th)
        pos = tl.cumsum(bad.to(tl.int32), 0)
        tl.store(zunits_ptr + base + pos - 1, u, mask=bad)
        base += tl.sum(bad.to(tl.int32), 0)
    tl.store(nz_ptr, base)


# Fixed tiles, no autotuning: the kernel adds into buffers other kernels have already written, so
# it must run exactly once (and its cost is only |Z| / width of one GEMM).
def _zero_tiles() -> dict:
    return dict(BT=32, BC=32, BR=32) if interpreting() else dict(BT=64, BC=64, BR=32, num_warps=4, num_stages=3)


@triton.jit
def _zero_kernel(
    a_ptr, am_ptr, w_ptr, b_ptr, m_ptr, zunits_ptr, nz_ptr, tot, sqt, part,
    T, R, ab, blk, tps, U,
    sat, sar, sam, swr, swc, smt, smc,
    HAS_AMASK: tl.constexpr, HAS_BIAS: tl.constexpr, SQ: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
):
    """Exact gradients of the zero-mask units zunits[:nz] (channels col of ``blk`` per unit):

        v[t, col] = sum_r (a[t, r] * am[r // ab]) * w[r, col] (+ b[col]);   prod = m[t, col] * v

    output side: a = x (R = K), am = mask_in, w[r, col] = W[col, r], b = bias, m = gy (v = y_pre)
    input side:  a = gy (R = N), am = mask_out, w[r, col] = W[r, col], m = x       (v = dxm)
    """
    nzc = tl.load(nz_ptr) * blk
    j0 = tl.program_id(1) * BC
    if j0 < nzc:
        row0 = tl.program_id(0) * BT
        rt = row0 + tl.arange(0, BT)
        t_ok = rt < T
        j = j0 + tl.arange(0, BC)
        j_ok = j < nzc
        unit = tl.load(zunits_ptr + j // blk, mask=j_ok, other=0)
        col = unit * blk + j % blk
        rr = tl.arange(0, BR)
        rt64 = rt.to(tl.int64)
        a_rows = a_ptr + rt64[:, None] * sat
        w_cols = w_ptr + col.to(tl.int64)[None, :] * swc
        acc = tl.zeros((BT, BC), dtype=tl.float32)
        for r0 in range(0, R, BR):
            kk = r0 + rr
            k_ok = kk < R
            a = tl.load(a_rows + kk[None, :] * sar, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_AMASK:
                am = tl.load(am_ptr + (kk // ab) * sam, mask=k_ok, other=0.0).to(tl.float32)
                if UPCAST:
                    a = a.to(tl.float32) * am[None, :]
                else:
                    a = a * am.to(a_ptr.dtype.element_ty)[None, :]
            w = tl.load(w_cols + kk.to(tl.int64)[:, None] * swr, mask=k_ok[:, None] & j_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + col, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        m2 = t_ok[:, None] & j_ok[None, :]
        g = tl.load(m_ptr + rt64[:, None] * smt + col[None, :] * smc, mask=m2, other=0.0).to(tl.float32)
        prod = tl.where(m2, g * acc, 0.0)
        _unit_reduce(prod, rt, unit, j_ok, row0, T, tps, U, tot, sqt, part, SQ, BT)


# ---------------------------------------------------------------------------------------------
# fold path (fp32 without TF32): masks folded into a weight copy, cuBLAS GEMMs
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fold_kernel(w_ptr, mi_ptr, mo_ptr, out_ptr, N, K, bi, bo, swn, swk, smi, smo,
                 HAS_MIN: tl.constexpr, HAS_MOUT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out = expand(mask_out)[:, None] * W * expand(mask_in)[None, :] (contiguous, W's dtype)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    n_ok = rn < N
    k_ok = rk < K
    m2 = n_ok[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * swn + rk[None, :] * swk, mask=m2, other=0.0).to(tl.float32)
    if HAS_MOUT:
        w = w * tl.load(mo_ptr + (rn // bo) * smo, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_MIN:
        w = w * tl.load(mi_ptr + (rk // bi) * smi, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------
# backward: per-unit finish
# ---------------------------------------------------------------------------------------------

@triton.jit
def _finalize_kernel(
    tot_ptr, sqt_ptr, part_ptr, S, U, acc_ptr, sqacc_ptr, dm_ptr,
    HAS_ACC: tl.constexpr, HAS_SQACC: tl.constexpr, HAS_DM: tl.constexpr, SQ: tl.constexpr,
    BU: tl.constexpr, BS: tl.constexpr,
):
    """Per unit: g = total (SQ 2: sum of the per-sample partials), q = sum_i g_i**2;
    acc += g, sq += q, dmask = g."""
    u = tl.program_id(0) * BU + tl.arange(0, BU)
    ok = u < U
    if SQ == 2:
        g = tl.zeros((BU,), tl.float32)
        q = tl.zeros((BU,), tl.float32)
        rs = tl.arange(0, BS)
        for s0 in range(0, S, BS):
            s = s0 + rs
            p = tl.load(part_ptr + s.to(tl.int64)[:, None] * U + u[None, :],
                        mask=(s < S)[:, None] & ok[None, :], other=0.0)
            g += tl.sum(p, 0)
            q += tl.sum(p * p, 0)
    else:
        g = tl.load(tot_ptr + u, mask=ok, other=0.0)
        if SQ == 1:
            q = tl.load(sqt_ptr + u, mask=ok, other=0.0)
        else:
            q = tl.zeros((BU,), tl.float32)
    if HAS_DM:
        tl.store(dm_ptr + u, g, mask=ok)
    if HAS_ACC:
        a = tl.load(acc_ptr + u, mask=ok, other=0.0)
        tl.store(acc_ptr + u, a + g.to(a.dtype), mask=ok)
    if HAS_SQACC:
        a = tl.load(sqacc_ptr + u, mask=ok, other=0.0)
        tl.store(sqacc_ptr + u, a + q.to(a.dtype), mask=ok)


# ---------------------------------------------------------------------------------------------
# Python entry points (2-D operands, validated by ops/masked_linear.py)
# ---------------------------------------------------------------------------------------------

def _degenerate(x: Tensor, weight: Tensor) -> bool:
    return x.dtype == torch.float64 or x.shape[0] == 0 or weight.shape[0] == 0 or weight.shape[1] == 0


def _stride(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.stride(0)


PATHS = ("auto", "fused", "fold")


def path(dtype: torch.dtype) -> str:
    """``fused`` (masks inside Triton GEMMs) or ``fold`` (masks folded into a weight copy, cuBLAS
    GEMMs, streaming Triton reductions). ``TSPRUNE_TRITON_MASKED_LINEAR`` = auto | fused | fold;
    auto picks fold for fp32 without TF32, where Triton's tl.dot runs on FMA units and cuBLAS
    SGEMM is the faster GEMM, and fused everywhere else (tensor-core dtypes)."""
    want = os.environ.get("TSPRUNE_TRITON_MASKED_LINEAR", "auto").strip().lower() or "auto"
    if want not in PATHS:
        raise ValueError(f"TSPRUNE_TRITON_MASKED_LINEAR={want!r} is not one of {', '.join(PATHS)}")
    if want != "auto":
        return want
    return "fold" if dtype == torch.float32 and dot_precision(dtype) == "ieee" and not interpreting() else "fused"


def _fold(weight: Tensor, mask_in, mask_out, block_in: int, block_out: int) -> Tensor:
    """expand(mask_out)[:, None] * W * expand(mask_in)[None, :]: one weight-sized pass."""
    if mask_in is None and mask_out is None:
        return weight
    N, K = weight.shape
    out = torch.empty((N, K), dtype=weight.dtype, device=weight.device)
    BN, BK = 32, 128
    _fold_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](
        weight, weight if mask_in is None else mask_in, weight if mask_out is None else mask_out, out,
        N, K, block_in, block_out, weight.stride(0), weight.stride(1), _stride(mask_in), _stride(mask_out),
        HAS_MIN=mask_in is not None, HAS_MOUT=mask_out is not None, BN=BN, BK=BK)
    return out


def _expand(m: Tensor, block: int) -> Tensor:
    return m.float().repeat_interleave(block) if block > 1 else m.float()


def masked_linear_fwd(x, weight, bias, mask_in, mask_out, block_in, block_out) -> Tensor:
    if _degenerate(x, weight):
        return torch_impl.masked_linear_fwd(x, weight, bias, mask_in, mask_out, block_in, block_out)
    T, K = x.shape
    N = weight.shape[0]
    if path(x.dtype) == "fold":
        wf = _fold(weight, mask_in, mask_out, block_in, block_out)
        if bias is None:
            return x @ wf.t()
        bf = bias if mask_out is None else (bias.float() * _expand(mask_out, block_out)).to(bias.dtype)
        return torch.addmm(bf, x, wf.t())
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    dummy = y
    grid = lambda meta: (triton.cdiv(T, meta["BT"]) * triton.cdiv(N, meta["BC"]),)  # noqa: E731
    _fwd_kernel[grid](
        x, weight, dummy if bias is None else bias,
        dummy if mask_in is None else mask_in, dummy if mask_out is None else mask_out, y,
        T, N, K, block_in, block_out,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        _stride(mask_in), _stride(mask_out),
        HAS_BIAS=bias is not None, HAS_MIN=mask_in is not None, HAS_MOUT=mask_out is not None,
        PREC=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype),
    )
    return y


def _finish(U, S, tot, sqt, part, mode, acc, sq, need, dummy) -> Optional[Tensor]:
    """Totals / squares of one side into the accumulators, and the mask gradient when asked."""
    dm = torch.empty(U, dtype=torch.float32, device=tot.device) if need else None
    if acc is None and sq is None and dm is None:
        return None
    BU = 128
    _finalize_kernel[(triton.cdiv(U, BU),)](
        tot, sqt, part, S, U, dummy if acc is None else acc, dummy if sq is None else sq,
        dummy if dm is None else dm,
        HAS_ACC=acc is not None, HAS_SQACC=sq is not None and mode > 0, HAS_DM=dm is not None,
        SQ=mode, BU=BU, BS=32,
    )
    return dm


def _sq_mode(want: bool, sq: Optional[Tensor], tps: int, block: int) -> int:
    if not want or sq is None:
        return 0
    return 1 if tps == 1 and block == 1 else 2


class _Side:
    """Scratch views and launch helpers of one side (input or output units)."""

    def __init__(self, tot, sqt, part, mode, U, block, mask):
        self.tot, self.sqt, self.part, self.mode, self.U, self.block, self.mask = tot, sqt, part, mode, U, block, mask


def _ratio(side: _Side, g: Tensor, v: Tensor, T: int, tps: int, th: float) -> None:
    """side += sum_t g * v / m over the units with a usable mask value."""
    C = g.shape[1]
    BT, BC = 64, 64
    _ratio_kernel[(triton.cdiv(T, BT), triton.cdiv(C, BC))](
        g, v, side.mask, side.tot, side.sqt, side.part, T, C, side.block, tps, side.U, th,
        g.stride(0), g.stride(1), v.stride(0), v.stride(1), side.mask.stride(0),
        SQ=side.mode, BT=BT, BC=BC)


def _zeros(side: _Side, a, amask, ablock, w_rows_cols, bias, m, T, R, C, tps, th, prec, upcast, dummy) -> None:
    """side += the exact contributions of the units whose mask is zero / tiny / not finite."""
    dev = m.device
    zunits = torch.empty(side.U, dtype=torch.int32, device=dev)
    nz = torch.empty(1, dtype=torch.int32, device=dev)
    _compact_kernel[(1,)](side.mask, side.mask.stride(0), side.U, th, zunits, nz, BLOCK=1024)
    w, swr, swc = w_rows_cols
    tiles = _zero_tiles()
    _zero_kernel[(triton.cdiv(T, tiles["BT"]), triton.cdiv(C, tiles["BC"]))](
        a, dummy if amask is None else amask, w, dummy if bias is None else bias, m, zunits, nz,
        side.tot, side.sqt, side.part, T, R, ablock, side.block, tps, side.U,
        a.stride(0), a.stride(1), _stride(amask), swr, swc, m.stride(0), m.stride(1),
        HAS_AMASK=amask is not None, HAS_BIAS=bias is not None, SQ=side.mode,
        PREC=prec, UPCAST=upcast, **tiles,
    )


def masked_linear_bwd(
    gy, x, y, weight, bias, mask_in, mask_out, block_in, block_out, tokens_per_sample,
    output_mask, acc_in, acc_out, sq_in, sq_out,
):
    """Same contract as torch_impl.masked_linear_bwd: (dx, dweight, dbias, dmask_in, dmask_out),
    None where ``output_mask`` is false; accumulators updated in place."""
    if _degenerate(x, weight):
        return torch_impl.masked_linear_bwd(
            gy, x, y, weight, bias, mask_in, mask_out, block_in, block_out, tokens_per_sample,
            output_mask, acc_in, acc_out, sq_in, sq_out)
    need_x, need_weight, need_bias, need_mask_in, need_mask_out = output_mask
    T, K = x.shape
    N = weight.shape[0]
    dev = x.device
    tps = max(int(tokens_per_sample), 1)
    want_in = mask_in is not None and (need_mask_in or acc_in is not None or sq_in is not None)
    want_out = mask_out is not None and (need_mask_out or acc_out is not None or sq_out is not None)
    sq_in_mode = _sq_mode(want_in, sq_in, tps, block_in)
    sq_out_mode = _sq_mode(want_out, sq_out, tps, block_out)
    if (sq_in_mode or sq_out_mode) and T % tps:
        raise ValueError(f"masked_linear: {T} tokens are not a whole number of samples of {tps} tokens")
    S = T // tps
    Ui = K // block_in if want_in else 0
    Uo = N // block_out if want_out else 0

    # one zeroed fp32 scratch: [tot_in | sq_in | part_in | tot_out | sq_out | part_out] (per side:
    # totals, plus their squares for one-token samples of one-channel units, or only the per-sample
    # partials for taylor2)
    sizes = [Ui if sq_in_mode != 2 else 0, Ui if sq_in_mode == 1 else 0, S * Ui if sq_in_mode == 2 else 0,
             Uo if sq_out_mode != 2 else 0, Uo if sq_out_mode == 1 else 0, S * Uo if sq_out_mode == 2 else 0]
    scratch = torch.zeros(max(sum(sizes), 1), dtype=torch.float32, device=dev)
    views, off = [], 0
    for n in sizes:
        views.append(scratch[off:off + n] if n else scratch)
        off += n
    side_in = _Side(*views[:3], sq_in_mode, max(Ui, 1), block_in, mask_in)
    side_out = _Side(*views[3:], sq_out_mode, max(Uo, 1), block_out, mask_out)

    dummy = scratch
    prec, upcast = dot_precision(x.dtype), upcast_dot(x.dtype)
    th = zero_threshold(x.dtype)
    dx = None
    if path(x.dtype) == "fold":
        if need_x or want_in:
            dx = gy @ _fold(weight, mask_in, mask_out, block_in, block_out)  # = dxm * m_in
        if want_in:
            _ratio(side_in, dx, x, T, tps, th)
        if want_out:
            _ratio(side_out, gy, y, T, tps, th)
        if not need_x:
            dx = None
    else:
        if need_x:
            dx = torch.empty((T, K), dtype=x.dtype, device=dev)
        if need_x or want_in:
            dx_arg = dx if dx is not None else dummy
            grid = lambda meta: (triton.cdiv(T, meta["BT"]) * triton.cdiv(K, meta["BC"]),)  # noqa: E731
            _dx_kernel[grid](
                gy, weight, x, y, dummy if mask_in is None else mask_in,
                dummy if mask_out is None else mask_out, dx_arg,
                *views, T, N, K, block_in, block_out, tps, side_in.U, side_out.U, th,
                gy.stride(0), gy.stride(1), weight.stride(0), weight.stride(1), x.stride(0), x.stride(1),
                y.stride(0), y.stride(1), dx_arg.stride(0) if dx is not None else 0,
                dx_arg.stride(1) if dx is not None else 0, _stride(mask_in), _stride(mask_out),
                NEED_DX=need_x, DO_IN=want_in, DO_OUT=want_out, SQ_IN=sq_in_mode, SQ_OUT=sq_out_mode,
                HAS_MIN=mask_in is not None, HAS_MOUT=mask_out is not None, PREC=prec, UPCAST=upcast,
            )
        elif want_out:
            _ratio(side_out, gy, y, T, tps, th)
    if want_out:  # y_pre[:, Z] = (x * m_in) @ W[Z].T + b[Z]
        _zeros(side_out, x, mask_in, block_in, (weight, weight.stride(1), weight.stride(0)), bias, gy,
               T, K, N, tps, th, prec, upcast, dummy)
    if want_in and path(x.dtype) == "fold":  # dxm[:, Z] = (gy * m_out) @ W[:, Z]
        _zeros(side_in, gy, mask_out, block_out, (weight, weight.stride(0), weight.stride(1)), None, x,
               T, N, K, tps, th, prec, upcast, dummy)

    dmask_in = _finish(Ui, S, *views[0:3], sq_in_mode, acc_in, sq_in, need_mask_in, dummy) if want_in else None
    dmask_out = _finish(Uo, S, *views[3:6], sq_out_mode, acc_out, sq_out, need_mask_out, dummy) if want_out else None

    dweight = dbias = None
    if need_weight or need_bias:
        mo_e = None if mask_out is None else _expand(mask_out, block_out)
        if need_weight:
            gw = (gy.t() @ x).float()  # weight-sized; the masks scale its rows / columns exactly
            if mo_e is not None:
                gw.mul_(mo_e[:, None])
            if mask_in is not None:
                gw.mul_(_expand(mask_in, block_in)[None, :])
            dweight = gw.to(weight.dtype)
        if need_bias:
            gb = gy.float().sum(0)
            dbias = (gb * mo_e if mo_e is not None else gb).to(weight.dtype)
    return (dx, dweight, dbias, dmask_in if need_mask_in else None, dmask_out if need_mask_out else None)
