"""ScoreArena statistics (criteria as objects): the flat layout, the all-reduce slice of every
built-in criterion, magnitude / Wanda from the arena's statistics against the per-tensor kernels
(bit for bit), custom criteria, and the one step-result type."""
import pytest
import torch

import tsprune_kernels as K
from tsprune_kernels.criteria import Criterion, criterion_names, get_criterion, register_criterion

SPECS = [("a.in", 5, 1), ("a.out", 4, 3), ("b.in", 3, 16), ("b.out", 6, 1)]
U = 5 + 4 + 3 + 6
C = 5 + 12 + 48 + 6


def test_layout_shares_one_flat_buffer():
    a = K.ScoreArena(SPECS, stats="wanda")
    assert a.flat.shape == (2 * U + 2 * C,) and a.n_channels == C
    for t in (a.acc, a.act, a.wsq):
        assert t.untyped_storage().data_ptr() == a.flat.untyped_storage().data_ptr()
    assert a.flat_offset("act") == 2 * U and a.flat_offset("wsq") == 2 * U + C
    assert a.slots["b.in"].channel_offset == 5 + 12 and a.chan_offsets.tolist() == [0, 5, 17, 65, 71]
    a.act_view("b.in").fill_(2.0)
    a.wsq_view("b.in").fill_(3.0)
    assert a.act[17:65].eq(2).all() and a.act[:17].eq(0).all() and a.wsq[17:65].eq(3).all()
    a.grad.fill_(1.0)
    a.zero_grad_()  # sums over samples go, weight norms stay
    assert a.acc.eq(0).all() and a.act.eq(0).all() and a.wsq[17:65].eq(3).all()
    # the default arena: gradient sums only, as before criteria were objects
    b = K.ScoreArena(SPECS)
    assert b.flat.shape == (2 * U,) and b.act is None and b.wsq is None
    with pytest.raises(ValueError, match="no 'act' buffer"):
        b.act_view("a.in")
    with pytest.raises(ValueError, match="reads wsq"):
        b.step("magnitude", ratio=0.1)
    with pytest.raises(ValueError, match="unknown statistics"):
        K.ScoreArena(SPECS, stats=("grad", "hessian"))


@pytest.mark.parametrize("crit,span", [("taylor", (0, U)), ("taylor2", (0, 2 * U)), ("fisher", (U, 2 * U)),
                                       ("wanda", (2 * U, 2 * U + C)), ("magnitude", None)])
def test_sample_sums_is_exactly_what_the_criterion_reads(crit, span):
    a = K.ScoreArena(SPECS, stats=crit)
    s = a.sample_sums()
    if span is None:
        assert s is None
        return
    assert s.is_contiguous() and s.numel() == span[1] - span[0]
    assert s.data_ptr() == a.flat[span[0]:].data_ptr()


def test_magnitude_and_wanda_from_the_arena_equal_the_kernels_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    a = K.ScoreArena(SPECS, stats=("grad", "act", "wsq"))
    weights, acts = {}, {}
    for name, units, block in SPECS:
        ch = units * block
        w = torch.randn(7, ch, generator=g) if name.endswith(".in") else torch.randn(ch, 9, generator=g)
        weights[name] = w
        a.wsq_view(name).copy_(w.square().sum(0 if name.endswith(".in") else 1))
        if name == "b.in":  # only one mask collects activations; the others fall back to magnitude
            acts[name] = torch.rand(ch, generator=g) * 10
            a.act_view(name).copy_(acts[name])
    assert a.act_units.tolist() == [False] * 9 + [True] * 3 + [False] * 6
    mag, wan = a.scores("magnitude"), a.scores("wanda")
    for name, units, block in SPECS:
        w = weights[name]
        want = K.magnitude_score(w, 1 if name.endswith(".in") else 0, block)
        assert torch.equal(a._slice(mag, name), want), name
        want_w = K.wanda_score(acts[name], w, block) if name in acts else want
        assert torch.equal(a._slice(wan, name), want_w), name


def test_names_and_objects_step_alike():
    g = torch.Generator().manual_seed(1)
    grad, sq = torch.randn(U, generator=g), torch.rand(U, generator=g)
    res = []
    for crit in ("taylor2", get_criterion("taylor2")):
        a = K.ScoreArena(SPECS)
        a.grad.copy_(grad)
        a.sq.copy_(sq)
        res.append((a.step(crit, 0.5, ratio=0.3), a.mask.clone(), a.imp.clone()))
    assert res[0][0] == res[1][0] and torch.equal(res[0][1], res[1][1]) and torch.equal(res[0][2], res[1][2])
    r = res[0][0]
    assert isinstance(r, K.StepResult) and r.total == U and r.macro_step == 1 and not r.capped
    assert r.live == r.live_after == U - r.pruned and r.live_before == U
    assert get_criterion("taylor2") == "taylor2" and str(get_criterion("wanda")) == "wanda"
    assert set(criterion_names()) >= {"taylor", "taylor2", "fisher", "magnitude", "wanda"}


def test_custom_criterion_on_the_arena():
    # a criterion the registry has never seen: |g| per unit, mean over each unit's channels of wsq
    def fn(arena):
        return arena.grad.abs() + arena.block_sum(arena.wsq) * 0.0

    crit = Criterion("grad_abs_test", ("grad", "wsq"), fn)
    assert crit.reads_weights and not crit.needs_sq and not crit.needs_act
    a = K.ScoreArena(SPECS, stats=crit)
    assert a.sample_sums().numel() == U  # only grad is summed over samples
    a.grad.copy_(torch.arange(U, dtype=torch.float32) - 3.0)  # |g| = 0 at unit 3
    r = a.step(crit, ratio=0.0)
    assert r.pruned == 1 and a.mask[3] == 0
    with pytest.raises(ValueError, match="criterion must be one of"):
        a.step("grad_abs_test", k=1)  # not registered: only the object works
    with pytest.raises(ValueError, match="unknown statistics"):
        Criterion("bad", ("grad", "curvature"))
    bad = Criterion("bad_shape_test", ("grad",), lambda ar: ar.grad[:3])
    with pytest.raises(ValueError, match="returned shape"):
        a.step(bad, k=1)
    nan = Criterion("nan_test", ("wsq",), lambda ar: torch.full_like(ar.imp, float("nan")))
    a.grad.fill_(1.0)
    with pytest.raises(ValueError, match="nan_test score contains NaN"):
        a.step(nan, k=1)
    assert a.acc.eq(0).all() and a.steps == 1  # refused: sums zeroed, nothing else changed


def test_register_criterion():
    crit = Criterion("neg_taylor_test", ("grad",), lambda a: a.grad * a.mask)
    register_criterion(crit)
    try:
        assert get_criterion("neg_taylor_test") is crit and "neg_taylor_test" in criterion_names()
        with pytest.raises(ValueError, match="already registered"):
            register_criterion(Criterion("neg_taylor_test", ("grad",), lambda a: a.grad))
        a = K.ScoreArena([("x", 4, 1)], stats="neg_taylor_test")
        a.grad.copy_(torch.tensor([4.0, -1.0, 2.0, 3.0]))
        a.step("neg_taylor_test", k=1)
        assert a.mask.tolist() == [1, 0, 1, 1]
    finally:
        from tsprune_kernels import criteria

        criteria._REGISTRY.pop("neg_taylor_test", None)


def test_step_refuses_a_criterion_whose_statistics_the_arena_does_not_collect():
    """An arena built for taylor holds an sq segment it never fills: fisher / taylor2 would score
    every unit 0 and prune everything; refused with the remedy instead, nothing changed."""
    a = K.ScoreArena(SPECS, stats="taylor")
    a.grad.copy_(torch.randn(U))
    for crit in ("fisher", "taylor2"):
        with pytest.raises(ValueError, match="reads sq"):
            a.step(crit, ratio=0.5)
    assert a.n_live() == U and a.imp.eq(0).all()


def test_a_non_finite_custom_score_is_refused_before_the_ema():
    """A custom rule can make NaN from finite statistics (0 / 0): the step raises naming the
    criterion and leaves masks, importance and the step count as they were."""
    crit = Criterion("ratio_test", ("grad", "sq"), lambda ar: ar.grad / ar.sq.sqrt())
    a = K.ScoreArena(SPECS)
    a.grad[: U // 2] = torch.rand(U // 2) + 0.1
    a.sq[: U // 2] = torch.rand(U // 2) + 0.1  # the rest stays 0 / 0 = NaN
    imp0, mask0 = a.imp.clone(), a.mask.clone()
    with pytest.raises(ValueError, match="ratio_test score contains NaN"):
        a.step(crit, ema=0.5, ratio=0.3)
    assert torch.equal(a.imp, imp0) and torch.equal(a.mask, mask0)


def test_step_scale_multiplies_the_score_before_the_ema():
    """step(scale=s) prunes and keeps importance exactly as step(score=taylor * s) does (fresh
    random gradients; the scale favours pruning the second mask)."""
    g = torch.Generator().manual_seed(3)
    arenas = [K.ScoreArena([("a", 40, 1), ("b", 24, 2)], stats="taylor") for _ in range(2)]
    scale = torch.ones(64)
    scale[40:] = 0.05
    for _ in range(2):
        grad = torch.randn(64, generator=g)
        for ar in arenas:
            ar.grad.copy_(grad)
        r0 = arenas[0].step("taylor", 0.5, ratio=0.25, scale=scale)
        r1 = arenas[1].step(ratio=0.25, ema=0.5, score=arenas[1].scores("taylor") * scale)
        assert r0.pruned == r1.pruned > 0
        assert torch.equal(arenas[0].mask, arenas[1].mask)
        assert torch.equal(arenas[0].imp, arenas[1].imp)
    with pytest.raises(ValueError, match="scale has shape"):
        arenas[0].step("taylor", ratio=0.1, scale=torch.ones(3))
