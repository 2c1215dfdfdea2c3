"""The torch backend: every op in plain, vectorised torch, on any device and dtype.

These are the kernels the ``tsprune::`` ops fall back to (registered as their
CompositeExplicitAutograd kernels by ``_library.py``): CPU tensors without the C++ extension,
CUDA tensors without Triton, any other device, and ``TSPRUNE_KERNELS_BACKEND=torch``. The Triton
module calls some of them for the cases it does not cover (fp64, empty dimensions). The tests'
float64 oracle is elsewhere (tests/kernels/_oracles.py). Block masks are expanded by a
broadcasting view (``[..., units, block] * m[:, None]``), never by materialising a channel-level mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def apply_block_mask(t: Tensor, mask: Tensor | None, block: int) -> Tensor:
    """``t * expand(mask)`` along the last dim, ``expand`` repeating each entry over ``block`` channels."""
    if mask is None:
        return t
    shape = t.shape
    return (t.unflatten(-1, (mask.numel(), block)) * mask.to(t.dtype).unsqueeze(-1)).reshape(shape)


def fold_masks(weight, bias, mask_in, mask_out, block_in, block_out):
    """(expand(mask_out)[:, None] * W * expand(mask_in)[None, :], bias * expand(mask_out)):
    the unmasked Linear with these computes exactly what the masked one does."""
    w = weight
    if mask_in is not None:
        w = apply_block_mask(w, mask_in, block_in)
    if mask_out is not None:
        w = apply_block_mask(w.t(), mask_out, block_out).t()
        bias = apply_block_mask(bias, mask_out, block_out) if bias is not None else None
    return w, bias


def masked_linear_fwd(x2, weight, bias, mask_in, mask_out, block_in, block_out) -> Tensor:
    """The torch backend's forward: one GEMM with the masks folded into the weight."""
    w, b = fold_masks(weight, bias, mask_in, mask_out, block_in, block_out)
    return F.linear(x2, w, b)


def _per_sample_block_sums(prod: Tensor, tokens_per_sample: int, block: int) -> Tensor:
    """prod [T, C] (fp32) -> [samples, C // block]: per-sample, per-unit sums."""
    t, c = prod.shape
    return prod.view(t // tokens_per_sample, tokens_per_sample, c // block, block).sum((1, 3))


# Below |m| (or m not finite) a mask entry counts as zero: its unit's gradient is recomputed, not
# divided out of y. It follows the activations' dtype (docs/KERNELS.md), on every backend: fp16
# activations go subnormal far earlier than fp32 / bf16 / fp64 ones.
_ZERO_TH = {torch.float16: 1e-4}
_ZERO_TH_DEFAULT = 1e-20


def zero_threshold(dtype: torch.dtype) -> float:
    """|mask| below which a unit's gradient is recomputed, for activations of ``dtype``."""
    return _ZERO_TH.get(dtype, _ZERO_TH_DEFAULT)


def _mask_grad_per_sample(known, other, mask, block, tps, acc_t, recompute_cols):
    """Per-sample, per-unit mask gradients from what the fast path keeps.

    known [T, C]: y (= y_pre * m_out) or dx (= dxm * m_in); other [T, C]: gy or x. For units with
    a nonzero mask the gradient is sum(known * other) / m; for zero units ``recompute_cols(idx)``
    returns the missing factor (y_pre or dxm) for those channels only."""
    m = mask.to(acc_t)
    per = _per_sample_block_sums(known.to(acc_t) * other.to(acc_t), tps, block)
    zero = ~(m.abs() >= zero_threshold(known.dtype))  # also catches NaN
    per = per / torch.where(zero, torch.ones_like(m), m)
    if bool(zero.any()):
        units = zero.nonzero().flatten()
        cols = (units[:, None] * block + torch.arange(block, device=units.device)).flatten()
        part = recompute_cols(cols).to(acc_t) * other[:, cols].to(acc_t)
        per[:, units] = _per_sample_block_sums(part, tps, block)
    return per


def masked_linear_bwd(
    gy, x, y, weight, bias, mask_in, mask_out, block_in, block_out, tokens_per_sample,
    output_mask, acc_in, acc_out, sq_in, sq_out,
):
    """Backward of masked_linear on 2-D operands, the torch backend (see docs/KERNELS.md).

    One GEMM for dx with the folded weight; mask gradients recovered from the saved output y and
    from dx, with a GEMM restricted to the channels of zero mask entries. Returns (dx, dweight,
    dbias, dmask_in, dmask_out); entries not needed are None. Mask gradients are fp32 (fp64 for
    fp64 inputs); accumulators are updated in place. ``output_mask``: five bools, which of the
    five results to compute."""
    need_x, need_weight, need_bias, need_mask_in, need_mask_out = output_mask
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    want_in = mask_in is not None and (need_mask_in or acc_in is not None or sq_in is not None)
    want_out = mask_out is not None and (need_mask_out or acc_out is not None or sq_out is not None)
    dx = dweight = dbias = dmask_in = dmask_out = None
    tps = tokens_per_sample
    if want_in:
        # dxm with only m_out folded in: the input-side gradient is then exact at every entry
        # (zeros included) without a second GEMM, and dx = dxm * m_in costs one pass over [T, K].
        w_out, _ = fold_masks(weight, None, None, mask_out, block_in, block_out)
        dxm = gy @ w_out
        per = _per_sample_block_sums(dxm.to(acc_t) * x.to(acc_t), tps, block_in)
        dmask_in = per.sum(0)
        _accumulate(acc_in, sq_in, dmask_in, per)
        if need_x:
            dx = apply_block_mask(dxm, mask_in, block_in)
    elif need_x:
        wf, _ = fold_masks(weight, None, mask_in, mask_out, block_in, block_out)
        dx = gy @ wf
    if want_out:
        def ypre_cols(cols):  # (x * expand(m_in)) @ W[cols].T + b[cols]
            xm = apply_block_mask(x, mask_in, block_in)
            return F.linear(xm, weight[cols], bias[cols] if bias is not None else None)

        per = _mask_grad_per_sample(y, gy, mask_out, block_out, tps, acc_t, ypre_cols)
        dmask_out = per.sum(0)
        _accumulate(acc_out, sq_out, dmask_out, per)
    if need_weight:
        dweight, _ = fold_masks(gy.t() @ x, None, mask_in, mask_out, block_in, block_out)
    if need_bias:
        dbias = apply_block_mask(gy.sum(0), mask_out, block_out)
    return (
        dx if need_x else None,
        dweight,
        dbias,
        dmask_in if need_mask_in else None,
        dmask_out if need_mask_out else None,
    )


def masked_linear_bwd_direct(
    gy, x, y, weight, bias, mask_in, mask_out, block_in, block_out, tokens_per_sample,
    output_mask, acc_in, acc_out, sq_in, sq_out,
):
    """Backward by the formula, no division by mask values: the path of every backend when a
    dimension is empty (tokens T = 0, samples = 0, K = 0 or N = 0), where it matches F.linear's
    gradients (zeros / empty tensors). Same signature and returns as masked_linear_bwd."""
    need_x, need_weight, need_bias, need_mask_in, need_mask_out = output_mask
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = x.shape[0]
    xm = apply_block_mask(x, mask_in, block_in)
    gym = apply_block_mask(gy, mask_out, block_out)
    dx = dweight = dbias = dmask_in = dmask_out = None

    def per_sample(prod, block):  # [T, C] -> [samples, units]; no tokens: nothing to add
        units = prod.shape[1] // block
        if t == 0 or tokens_per_sample <= 0:
            return prod.new_zeros((0, units), dtype=acc_t)
        return _per_sample_block_sums(prod.to(acc_t), tokens_per_sample, block)

    if mask_in is not None and (need_mask_in or acc_in is not None or sq_in is not None):
        per = per_sample((gym @ weight).to(acc_t) * x.to(acc_t), block_in)
        dmask_in = per.sum(0)
        _accumulate(acc_in, sq_in, dmask_in, per)
    if mask_out is not None and (need_mask_out or acc_out is not None or sq_out is not None):
        per = per_sample(gy.to(acc_t) * F.linear(xm, weight, bias).to(acc_t), block_out)
        dmask_out = per.sum(0)
        _accumulate(acc_out, sq_out, dmask_out, per)
    if need_x:
        dx = apply_block_mask(gym @ weight, mask_in, block_in)
    if need_weight:
        dweight = gym.t() @ xm
    if need_bias:
        dbias = gym.sum(0)
    return (
        dx,
        dweight,
        dbias,
        dmask_in if need_mask_in else None,
        dmask_out if need_mask_out else None,
    )


def _accumulate(acc, sq, total, per):
    if acc is not None:
        acc.add_(total.to(acc.dtype))
    if sq is not None:
        sq.add_(per.square().sum(0).to(sq.dtype))


# -- scores --------------------------------------------------------------------------------------

def block_reduce(scores: Tensor, block: int, op: str = "sum") -> Tensor:
    """[..., F] -> [..., F // block] reducing ``block`` consecutive entries with sum / mean / l2 / max."""
    v = scores.unflatten(-1, (scores.shape[-1] // block, block))
    if op == "sum":
        return v.sum(-1)
    if op == "mean":
        return v.mean(-1)
    if op == "l2":
        return v.square().sum(-1).sqrt()
    if op == "max":
        return v.amax(-1)
    raise ValueError(f"block_reduce op must be one of sum, mean, l2, max; got {op!r}")


def taylor_score(grad: Tensor, mask: Tensor) -> Tensor:
    return -grad * mask


def taylor2_score(grad: Tensor, sq: Tensor) -> Tensor:
    return -grad + 0.5 * sq


def fisher_score(sq: Tensor) -> Tensor:
    return sq.clone()


def magnitude_score(weight: Tensor, dim: int, block: int = 1) -> Tensor:
    """L2 norm of each output row (dim=0) or input column (dim=1) of ``weight``, per unit of ``block``."""
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    sq = w.square().sum(1 if dim == 0 else 0)
    return block_reduce(sq, block, "sum").sqrt()


def wanda_score(act_sq: Tensor, weight: Tensor, block: int = 1) -> Tensor:
    """Per input channel ``||X_j||_2 * ||W[:, j]||_2`` (act_sq = sum of x_j**2), summed per unit."""
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    per = act_sq.to(w.dtype).sqrt() * w.square().sum(0).sqrt()
    return block_reduce(per, block, "sum")


def act_sq_accumulate_(x: Tensor, acc: Tensor) -> Tensor:
    acc.add_(x.reshape(-1, x.shape[-1]).to(acc.dtype).square().sum(0))
    return acc


def ema_update_(imp: Tensor, score: Tensor, ema: float) -> Tensor:
    return imp.mul_(1.0 - ema).add_(score.to(imp.dtype), alpha=ema)


# -- selection -----------------------------------------------------------------------------------

_ORDERED_BITS = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}


def kth_smallest_abs(tensors: list[Tensor], k: int, ignore_zeros: bool = True) -> Tensor:
    """k-th smallest |v| over all tensors by radix select on the float bit pattern: per pass one
    histogram of 8 bits per tensor (bincount), no concatenation and no sort. fp16/bf16 upcast exactly."""
    dtype = tensors[0].dtype
    work_t = torch.float32 if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float64
    int_t, nbits = _ORDERED_BITS[work_t]
    flats = [t.detach().reshape(-1).to(work_t).abs() for t in tensors]
    for f in flats:
        if not bool(torch.isfinite(f).all()):
            raise ValueError("global_kth_smallest: non-finite value (NaN or Inf) in the scores")
    # |v| >= 0, so its bit pattern read as a signed integer is ordered like the value.
    bits = [f.view(int_t) for f in flats]
    keep = [(b != 0) if ignore_zeros else torch.ones_like(b, dtype=torch.bool) for b in bits]
    count = sum(int(kp.sum()) for kp in keep)
    if not 1 <= k <= count:
        raise ValueError(f"global_kth_smallest: k={k} out of range [1, {count}] (candidates)")
    prefix = 0  # the high bits chosen so far
    remaining = k
    for shift in range(nbits - 8, -1, -8):
        hist = torch.zeros(256, dtype=torch.int64, device=flats[0].device)
        for b, kp in zip(bits, keep):
            sel = b[kp]
            hi = sel >> (shift + 8) if shift + 8 < nbits else torch.zeros_like(sel)
            digit = ((sel >> shift) & 0xFF)[hi == (prefix >> (shift + 8) if shift + 8 < nbits else 0)]
            hist += torch.bincount(digit.long(), minlength=256)
        csum = hist.cumsum(0)
        d = int(torch.searchsorted(csum, torch.tensor(remaining, device=csum.device)))
        remaining -= int(csum[d - 1]) if d > 0 else 0
        prefix |= d << shift
    out = torch.tensor(prefix, dtype=int_t, device=flats[0].device).view(work_t)
    return out  # fp32 for half inputs (exact: the upcast is exact), like the compiled paths


def prune_lowest_(mask: Tensor, imp: Tensor, k: int) -> int:
    """mask = imp = 0 for the k live units (mask != 0) of smallest nonzero |imp| (ties: lower index
    first) and for live units with imp == 0. Returns how many were pruned."""
    live = mask != 0
    a = imp.abs()
    zero = live & (a == 0)
    cand = live & (a != 0)
    n_cand = int(cand.sum())
    k = min(int(k), n_cand)
    sel = zero.clone()
    if k > 0:
        t = kth_smallest_abs([a[cand]], k, ignore_zeros=False)
        less = cand & (a < t)
        tie = cand & (a == t)
        need = k - int(less.sum())
        sel |= less | (tie & (tie.cumsum(0) <= need))
    mask.masked_fill_(sel, 0)
    imp.masked_fill_(sel, 0)
    return int(sel.sum())


# -- repack --------------------------------------------------------------------------------------

def repack(tensors, keep_rows, keep_cols):
    out = []
    for t, r, c in zip(tensors, keep_rows, keep_cols):
        v = t if r is None else t.index_select(0, r)
        if c is not None:
            v = v.index_select(1, c)
        v = v.contiguous()
        if v.data_ptr() == t.data_ptr() and t.numel() > 0:
            v = v.clone()
        out.append(v)
    return out
