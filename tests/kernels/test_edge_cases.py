"""Issue 8's kernel cases, on every backend: empty dimensions, the dtype-dependent "is zero" test of
mask entries, integer arguments out of range, and the arena after a refused NaN / Inf step.

Each test reproduces what failed before (ZeroDivisionError / RuntimeError on empty dims, dmask 0.0
instead of -1.83 for an fp16 mask entry of 1e-8 on the torch backend, a pybind dump for k = 2**70,
an arena that refused every later step) and checks against float64 references or hand values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tsprune_kernels as K
import _oracles as reference


def _ref_grads(x, w, b, mi, mo, bi, bo):
    """float64 autograd of the formula: (dx, dw, db, dmi, dmo)."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b, mi, mo)]
    y = reference.masked_linear(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], bi, bo)
    gy = torch.ones_like(y)  # any upstream gradient; ones keeps the hand check simple
    y.backward(gy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize(
    "shape,n_out",
    [
        ((3, 0, 8), 6),  # zero tokens per sample (the case)
        ((0, 5, 8), 6),  # zero samples
        ((0, 8), 6),  # zero rows
        ((3, 4, 0), 6),  # zero input features
        ((3, 4, 8), 0),  # zero output features
    ],
)
def test_masked_linear_empty_dims_match_f_linear(backend, shape, n_out):
    g = torch.Generator().manual_seed(0)
    k = shape[-1]
    x = torch.randn(shape, generator=g).to(torch.get_default_device()).requires_grad_(True)
    w = torch.randn(n_out, k, generator=g).to(x.device).requires_grad_(True)
    b = torch.randn(n_out, generator=g).to(x.device).requires_grad_(True)
    mi = torch.rand(k // 2 if k else 0, generator=g).to(x.device).requires_grad_(True) if k else None
    mo = torch.rand(n_out // 2 if n_out else 0, generator=g).to(x.device).requires_grad_(True) if n_out else None
    bi, bo = (2 if k else 1), (2 if n_out else 1)
    acc_o = torch.full((n_out // 2,), 5.0, device=x.device) if n_out else None
    sq_o = torch.full((n_out // 2,), 7.0, device=x.device) if n_out else None
    y = K.masked_linear(x, w, b, mi, mo, bi, bo)
    assert y.shape == F.linear(x, w, b).shape
    y.backward(torch.ones_like(y))
    y_ref, (dx, dw, db, dmi, dmo) = _ref_grads(x, w, b, mi, mo, bi, bo)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), dx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), dw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad.double(), db, atol=1e-5, rtol=1e-5)
    if mi is not None:
        torch.testing.assert_close(mi.grad.double(), dmi, atol=1e-5, rtol=1e-5)
    if mo is not None:
        torch.testing.assert_close(mo.grad.double(), dmo, atol=1e-5, rtol=1e-5)
    if n_out:  # accumulators of an empty batch: + 0 (here via a second call with accumulators)
        mo2 = mo.detach().clone().requires_grad_(True)
        y2 = K.masked_linear(x.detach().requires_grad_(True), w, b, mi, mo2, bi, bo,
                             grad_acc_out=acc_o, sq_acc_out=sq_o)
        y2.backward(torch.ones_like(y2))
        torch.testing.assert_close(acc_o.double(), 5.0 + dmo, atol=1e-5, rtol=1e-5)
        if x.shape[0] * (x.shape[1] if x.dim() == 3 else 1) == 0:
            assert acc_o.eq(5.0).all() and sq_o.eq(7.0).all()


def test_masked_linear_zero_in_features_output_gradient_is_bias(backend):
    """K = 0: y_pre = b, so dmask_out = sum_t gy * b per unit (hand value), like F.linear's."""
    x = torch.zeros(2, 3, 0, requires_grad=True)
    w = torch.zeros(4, 0, requires_grad=True)
    b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mo = torch.tensor([0.5, 0.0, 2.0, 1.0], requires_grad=True)
    y = K.masked_linear(x, w, b, None, mo)
    torch.testing.assert_close(y, (b * mo.detach()).expand(2, 3, 4))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(mo.grad, 6 * b)  # 6 tokens, each gy = 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tiny_mask_entry_gradient_follows_the_dtype(backend, dtype):
    """The issue: fp16, mask_out entry 1e-8 -> torch backend dmask 0.0 vs float64 reference -1.83."""
    g = torch.Generator().manual_seed(5)
    dev = torch.get_default_device()
    x = torch.randn(4, 6, 16, generator=g).to(dev, dtype)
    w = (torch.randn(8, 16, generator=g) * 0.3).to(dev, dtype)
    b = torch.randn(8, generator=g).to(dev, dtype)
    mo = torch.tensor([1.0, 1e-8, 0.0, 1.0, 0.5, 1e-30, 1.0, 2.0], device=dev, requires_grad=True)
    gy = torch.randn(4, 6, 8, generator=g).to(dev, dtype)
    y = K.masked_linear(x, w, b, None, mo)
    y.backward(gy)
    xd, wd, bd, gd = (t.double() for t in (x, w, b, gy))
    want = (gd * F.linear(xd, wd, bd)).sum((0, 1))  # d/dm_out of sum(gy * y_pre * m_out)
    tol = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}[dtype]
    scale = want.abs().max().item()
    err = (mo.grad.double() - want).abs().max().item()
    assert err <= tol * scale, (mo.grad, want)
    assert abs(mo.grad[1].item() - want[1].item()) <= tol * scale  # the 1e-8 entry itself


def test_zero_threshold_is_one_table():
    assert reference.zero_threshold(torch.float16) == 1e-4
    assert reference.zero_threshold(torch.float32) == reference.zero_threshold(torch.bfloat16) == 1e-20


@pytest.mark.parametrize("k", [2**70, 2**63, -1, -(2**70)])
def test_global_kth_smallest_k_out_of_range(backend, k):
    t = torch.rand(10) + 0.1
    with pytest.raises(ValueError, match="global_kth_smallest: k"):
        K.global_kth_smallest([t], k)


def test_global_kth_smallest_k_above_candidates(backend):
    t = torch.tensor([0.0, 0.0, 1.0, 2.0])
    with pytest.raises(ValueError):
        K.global_kth_smallest([t], 3)  # only two nonzero candidates
    assert float(K.global_kth_smallest([t], 2)) == 2.0
    with pytest.raises(TypeError, match="k must be an int"):
        K.global_kth_smallest([t], 1.0)


@pytest.mark.parametrize("k", [2**70, 2**63, 10**6])
def test_prune_lowest_huge_k_prunes_every_live_unit(backend, k):
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    imp = torch.tensor([0.3, -0.1, 0.0, 2.0])
    assert K.prune_lowest_(mask, k, imp=imp) == 3
    assert mask.eq(0).all() and imp.eq(0).all()
    with pytest.raises(ValueError, match="k must be >= 0"):
        K.prune_lowest_(mask, -(2**70), imp=imp)


@pytest.mark.parametrize("block", [2**70, 2**63])
def test_block_arguments_out_of_range(backend, block):
    x = torch.randn(2, 0)
    w = torch.randn(3, 0)
    with pytest.raises(ValueError, match="block for mask_in"):
        K.masked_linear(x, w, None, torch.ones(0), None, block, 1)
    with pytest.raises(ValueError, match="block"):
        K.block_reduce(torch.randn(2, 0), block)
    with pytest.raises(ValueError, match="block"):
        K.magnitude_score(torch.randn(3, 0), 1, block)
    with pytest.raises(ValueError, match="units of mask 'a'"):
        K.ScoreArena([("a", 2**70, 1)])


def test_arena_step_huge_k_and_min_live(backend):
    arena = K.ScoreArena([("a", 4, 1), ("b", 2, 1)])
    arena.acc[0].copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    r = arena.step("taylor", k=2**70, min_live=2)
    assert (r.live_before, r.live_after) == (6, 2)
    with pytest.raises(ValueError, match="min_live must be >= 0"):
        arena.step("taylor", k=1, min_live=-1)


def test_refused_nan_step_leaves_the_arena_usable():
    """The issue: after a NaN micro-batch every later step refused too (accumulators stayed NaN).
    Contract: the refused step zeroes the accumulators and changes nothing else. (Arena logic is
    backend independent; TSPRUNE_KERNELS_BACKEND=cpp would refuse ema_update_, which has no C++.)"""
    arena = K.ScoreArena([("a", 4, 1), ("b", 3, 2)])
    arena.acc[0].copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]))
    arena.step("taylor", ratio=0.0)  # one good step: imp set, steps = 1
    mask0, imp0 = arena.mask.clone(), arena.imp.clone()
    arena.acc[0].copy_(torch.tensor([1.0, float("nan"), 3.0, 4.0, 5.0, float("inf"), 7.0]))
    with pytest.raises(ValueError, match="skipped.*accumulators were zeroed.*ready for the next macro-batch"):
        arena.step("taylor", ema=0.5, ratio=0.2)
    assert torch.equal(arena.mask, mask0) and torch.equal(arena.imp, imp0) and arena.steps == 1
    assert arena.acc.eq(0).all()
    # the next macro-batch steps normally, with the EMA of the good steps only
    g = torch.tensor([7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    arena.acc[0].copy_(g)
    r = arena.step("taylor", ema=0.5, ratio=0.0)
    assert r.pruned == 0 and arena.steps == 2
    torch.testing.assert_close(arena.imp, 0.5 * K.taylor_score(g, mask0) + 0.5 * imp0)
    # a given non-finite score is refused the same way
    arena.acc[0].fill_(1.0)
    with pytest.raises(ValueError, match="given score contains NaN or Inf.*skipped"):
        arena.step(score=torch.full((7,), float("nan")), ratio=0.1)
    assert arena.acc.eq(0).all() and arena.steps == 2
