"""Triton selection: k-th smallest |v| over many tensors, and prune_lowest_ (the arena step).

Stage: pruning step (ScoreArena.step -> ops/select.py -> here). Receives score tensors (and for
pruning the flat arena mask / importance), hands back the threshold value or prunes in place.

Radix select on the IEEE bit pattern of |v| (sign bit cleared: monotonic for non-negative floats),
8 bits per pass from the top (fp32 keys have 31 bits: passes of 7, 8, 8, 8 bits; fp64: 7 + 7 x 8;
fp16 / bf16 are upcast exactly to fp32). Pass p histograms, over every candidate whose higher bits
equal the prefix chosen so far, the next 8 bits: each program histograms a chunk in registers
(``tl.histogram``) and adds the 256 counts to global memory with one atomic per non-empty bin.
No kernel writes the chosen prefix: every program of pass p re-derives it from the histograms of
passes 0 .. p-1 (a 256-entry scan per pass, negligible), so there is no "find the bucket" launch
and no host sync. No sort, no concatenation: the tensors are reached through a device table of
data pointers and a table of (tensor, start) chunks.

Launches: global_kth_smallest = 1 memset + passes (4 for fp32) + 1 finish, with one host sync after
pass 0 (the candidate count and the NaN / Inf check, needed to raise the documented errors).
prune_lowest_ = 1 memset + 4 passes + tie count + apply, and one sync at the end for the returned
count. Ties at the threshold go to the lowest flat indices first: each program of the apply
kernel ranks its ties with a block cumsum plus the tie counts of all earlier blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._util import interpreting

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
       torch.bfloat16: tl.bfloat16}


def _block() -> int:
    return 1024 if interpreting() else 4096


def _nbits(dtype: torch.dtype) -> int:
    return 63 if dtype == torch.float64 else 31


def _npasses(nbits: int) -> int:
    return 1 + (nbits - 7) // 8


@triton.jit
def _keys(v, IS64: tl.constexpr):
    """Bit pattern of |v| as a signed integer (ordered like |v|)."""
    if IS64:
        k = v.to(tl.float64).to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        k = v.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return k


@triton.jit
def _select_state(hist_ptr, k, P: tl.constexpr, NBITS: tl.constexpr, IS64: tl.constexpr,
                  CLAMP: tl.constexpr):
    """After passes 0 .. P-1: (key prefix of the k-th smallest candidate, its rank among the
    candidates sharing that prefix). CLAMP: k = min(k, number of candidates)."""
    bins = tl.arange(0, 256)
    rem = k + tl.zeros([], tl.int64)  # (k may be the constant 1: no tensor methods on it)
    if CLAMP:
        rem = tl.minimum(rem, tl.sum(tl.load(hist_ptr + bins).to(tl.int64), 0))
    if IS64:
        prefix = tl.full([], 0, tl.int64)
    else:
        prefix = tl.full([], 0, tl.int32)
    for p in tl.static_range(P):
        h = tl.load(hist_ptr + p * 256 + bins).to(tl.int64)
        c = tl.cumsum(h, 0)
        d = tl.sum((c < rem).to(tl.int32), 0)  # first bin whose cumulative count reaches rem
        rem = rem - tl.sum(tl.where(bins < d, h, 0), 0)
        prefix = prefix | (d.to(prefix.dtype) << (NBITS - 7 - 8 * p))
    return prefix, rem


@triton.jit
def _hist_kernel(
    ptab, sizes, ctid, cstart, mask_ptr, hist_ptr, info_ptr, k,
    P: tl.constexpr, NBITS: tl.constexpr, IS64: tl.constexpr, DT: tl.constexpr,
    IGNORE_ZEROS: tl.constexpr, HAS_MASK: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.load(ctid + pid)
    start = tl.load(cstart + pid)
    n = tl.load(sizes + tid)
    base = tl.load(ptab + tid).to(tl.pointer_type(DT))
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < n
    key = _keys(tl.load(base + offs, mask=ok, other=0.0), IS64)
    cand = ok
    if IGNORE_ZEROS:
        cand = cand & (key != 0)
    if HAS_MASK:  # prune mode: one tensor, candidates are live (mask != 0)
        cand = cand & (tl.load(mask_ptr + offs, mask=ok, other=0.0) != 0)
    if P == 0:
        if IS64:
            bad = cand & (key >= 0x7FF0000000000000)
        else:
            bad = cand & (key >= 0x7F800000)
        nbad = tl.sum(bad.to(tl.int32), 0)
        if nbad > 0:
            tl.atomic_add(info_ptr, nbad, sem="relaxed")
    else:
        prefix, rem = _select_state(hist_ptr, k, P, NBITS, IS64, CLAMP)
        cand = cand & ((key >> (NBITS - 7 - 8 * (P - 1))) == (prefix >> (NBITS - 7 - 8 * (P - 1))))
    digit = tl.where(cand, (key >> (NBITS - 7 - 8 * P)) & 255, 0).to(tl.int32)
    bins = tl.arange(0, 256)
    h = tl.histogram(digit, 256)
    h = h - tl.where(bins == 0, BLOCK - tl.sum(cand.to(tl.int32), 0), 0)  # non-candidates sat in bin 0
    tl.atomic_add(hist_ptr + P * 256 + bins, h, mask=h > 0, sem="relaxed")


@triton.jit
def _finish_kernel(hist_ptr, out_ptr, k, NP: tl.constexpr, NBITS: tl.constexpr, IS64: tl.constexpr):
    prefix, rem = _select_state(hist_ptr, k, NP, NBITS, IS64, False)
    tl.store(out_ptr, prefix)


@triton.jit
def _prune_kernel(
    imp_ptr, mask_ptr, n, hist_ptr, ties_ptr, count_ptr, k,
    PHASE: tl.constexpr, NP: tl.constexpr, NBITS: tl.constexpr, IS64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """PHASE 0: ties[pid] = number of candidates equal to the threshold in this block.
    PHASE 1: prune (mask = imp = 0) the live zeros, the candidates below the threshold and the
    first ``need`` ties in flat order; count them."""
    pid = tl.program_id(0)
    t, need = _select_state(hist_ptr, k, NP, NBITS, IS64, True)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    key = _keys(tl.load(imp_ptr + offs, mask=ok, other=0.0), IS64)
    live = ok & (tl.load(mask_ptr + offs, mask=ok, other=0.0) != 0)
    cand = live & (key != 0)
    tie = cand & (key == t)
    if PHASE == 0:
        tl.store(ties_ptr + pid, tl.sum(tie.to(tl.int32), 0))
    else:
        before = tl.program_id(0) * 0
        for c0 in range(0, pid, 1024):
            idx = c0 + tl.arange(0, 1024)
            before += tl.sum(tl.load(ties_ptr + idx, mask=idx < pid, other=0), 0)
        rank = before + tl.cumsum(tie.to(tl.int32), 0)
        sel = (live & (key == 0)) | (cand & (key < t)) | (tie & (rank <= need))
        tl.store(mask_ptr + offs, tl.zeros([BLOCK], dtype=mask_ptr.dtype.element_ty), mask=sel)
        tl.store(imp_ptr + offs, tl.zeros([BLOCK], dtype=imp_ptr.dtype.element_ty), mask=sel)
        tl.atomic_add(count_ptr, tl.sum(sel.to(tl.int32), 0), sem="relaxed")


def _tables(flats: list[Tensor], block: int, device) -> tuple[Tensor, ...]:
    """One int64 device tensor holding [data pointers | sizes | chunk tensor ids | chunk starts]."""
    ptrs, sizes, ctid, cstart = [], [], [], []
    for i, f in enumerate(flats):
        n = f.numel()
        ptrs.append(f.data_ptr())
        sizes.append(n)
        for s in range(0, n, block):
            ctid.append(i)
            cstart.append(s)
    m, c = len(flats), len(ctid)
    tab = torch.tensor(ptrs + sizes + ctid + cstart, dtype=torch.int64).to(device)
    return tab[:m], tab[m:2 * m], tab[2 * m:2 * m + c], tab[2 * m + c:], c


def kth_smallest_abs(tensors: list[Tensor], k: int, ignore_zeros: bool = True) -> Tensor:
    """Same contract as torch_impl.kth_smallest_abs (ValueError on NaN / Inf or k out of range);
    returns a 0-d tensor, float32 for half inputs (the value is exact), else the input dtype."""
    dtype = tensors[0].dtype
    dev = tensors[0].device
    is64 = dtype == torch.float64
    nbits = _nbits(dtype)
    npass = _npasses(nbits)
    block = _block()
    flats = [t.detach().reshape(-1) for t in tensors if t.numel() > 0]
    count = 0
    hist = torch.zeros(npass * 256 + 1, dtype=torch.int32, device=dev)
    if flats:
        ptab, sizes, ctid, cstart, nchunks = _tables(flats, block, dev)
        args = (ptab, sizes, ctid, cstart, hist, hist, hist[npass * 256:])
        meta = dict(NBITS=nbits, IS64=is64, DT=_TL[dtype], IGNORE_ZEROS=bool(ignore_zeros),
                    HAS_MASK=False, CLAMP=False, BLOCK=block)
        _hist_kernel[(nchunks,)](*args, int(k), P=0, **meta)
        count, bad = torch.stack([hist[:256].sum(), hist[npass * 256]]).tolist()  # the one sync
        if bad:
            raise ValueError("global_kth_smallest: non-finite value (NaN or Inf) in the scores")
    if not 1 <= k <= count:
        raise ValueError(f"global_kth_smallest: k={k} out of range [1, {count}] (candidates)")
    for p in range(1, npass):
        _hist_kernel[(nchunks,)](*args, int(k), P=p, **meta)
    bits = torch.empty((), dtype=torch.int64 if is64 else torch.int32, device=dev)
    _finish_kernel[(1,)](hist, bits, int(k), NP=npass, NBITS=nbits, IS64=is64)
    return bits.view(torch.float64 if is64 else torch.float32)


def prune_lowest_(mask: Tensor, imp: Tensor, k: int) -> int:
    """Same contract as torch_impl.prune_lowest_ (1-D, equal shapes, finite scores, k >= 0)."""
    n = imp.numel()
    if n == 0:
        return 0
    if not (mask.is_contiguous() and imp.is_contiguous()):
        from .. import torch_impl

        return torch_impl.prune_lowest_(mask, imp, k)
    dev = imp.device
    is64 = imp.dtype == torch.float64
    nbits = _nbits(imp.dtype)
    npass = _npasses(nbits)
    block = _block()
    k = min(int(k), n)
    nblocks = triton.cdiv(n, block)
    ibuf = torch.zeros(npass * 256 + 2 + nblocks, dtype=torch.int32, device=dev)
    hist, info, count, ties = ibuf[:npass * 256], ibuf[npass * 256:], ibuf[npass * 256 + 1:], ibuf[npass * 256 + 2:]
    ptab, sizes, ctid, cstart, nchunks = _tables([imp], block, dev)
    meta = dict(NBITS=nbits, IS64=is64, DT=_TL[imp.dtype], IGNORE_ZEROS=True, HAS_MASK=True,
                CLAMP=True, BLOCK=block)
    for p in range(npass):
        _hist_kernel[(nchunks,)](ptab, sizes, ctid, cstart, mask, hist, info, k, P=p, **meta)
    for phase in (0, 1):
        _prune_kernel[(nblocks,)](imp, mask, n, hist, ties, count, k, PHASE=phase, NP=npass,
                                  NBITS=nbits, IS64=is64, BLOCK=block)
    return int(count[0])
