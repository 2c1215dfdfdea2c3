"""ScoreArena: layout, views, accumulation through masked_linear, and the pruning step."""
import math

import pytest
import torch

import tsprune_kernels as K


def test_layout_and_views_share_storage():
    a = K.ScoreArena([("q.out", 4, 2), ("ffn.in", 6, 1)])
    assert a.n_units == 10 and a.offsets.tolist() == [0, 4, 10] and a.blocks.tolist() == [2, 1]
    assert a.unit_slot.tolist() == [0] * 4 + [1] * 6
    a.masks()["ffn.in"][2] = 0.0
    assert a.mask[6] == 0 and a.mask_view("ffn.in")[2] == 0
    a.grad_view("q.out").add_(1.0)
    assert a.acc[0, :4].eq(1).all() and a.acc[0, 4:].eq(0).all()
    assert a.mask_view("q.out").requires_grad and a.mask_view("q.out").is_leaf
    assert a.live_per_mask().tolist() == [4, 5]
    with pytest.raises(ValueError, match="duplicate"):
        K.ScoreArena([("x", 1, 1), ("x", 2, 1)])


def _two_layer(arena, x, w1, w2):
    h = K.masked_linear(x, w1, None, arena.mask_view("l1.in"), arena.mask_view("l1.out"), 1, 2,
                        grad_acc_in=arena.grad_view("l1.in"), grad_acc_out=arena.grad_view("l1.out"),
                        sq_acc_in=arena.sq_view("l1.in"), sq_acc_out=arena.sq_view("l1.out"))
    return K.masked_linear(torch.tanh(h), w2, None, arena.mask_view("l2.in"), None, 2, 1,
                           grad_acc_in=arena.grad_view("l2.in"), sq_acc_in=arena.sq_view("l2.in"))


def test_accumulates_over_microbatches_and_steps(backend, gen):
    arena = K.ScoreArena([("l1.in", 8, 1), ("l1.out", 5, 2), ("l2.in", 5, 2)])
    w1 = torch.randn(10, 8, generator=gen)
    w2 = torch.randn(3, 10, generator=gen)
    xs = torch.randn(4, 3, 8, generator=gen)
    # oracle: plain autograd masks over the whole macro-batch, per-sample loop for the squares
    masks = {n: torch.ones(s.units, dtype=torch.float64, requires_grad=True) for n, s in arena.slots.items()}
    per_sample = {n: [] for n in masks}
    for i in range(4):
        for m in masks.values():
            m.grad = None
        import _oracles as R
        h = R.masked_linear(xs[i : i + 1].double(), w1.double(), None, masks["l1.in"], masks["l1.out"], 1, 2)
        out = R.masked_linear(torch.tanh(h), w2.double(), None, masks["l2.in"], None, 2, 1)
        out.pow(2).sum().backward()
        for n, m in masks.items():
            per_sample[n].append(m.grad.clone())
    for mb in (xs[:2], xs[2:]):  # two micro-batches accumulate
        _two_layer(arena, mb, w1, w2).pow(2).sum().backward()
    for n in masks:
        g = torch.stack(per_sample[n])
        torch.testing.assert_close(arena.grad_view(n).double(), g.sum(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(arena.sq_view(n).double(), g.square().sum(0), atol=1e-4, rtol=1e-4)


def test_step_taylor_ema_and_geometric_count():
    arena = K.ScoreArena([("a", 10, 1), ("b", 10, 1)])
    g = torch.linspace(-1, 1, 20)
    arena.grad.copy_(g)
    r = arena.step("taylor", ema=0.4, ratio=0.1)
    assert r.k == math.ceil(0.1 * 20) and r.live_before == 20
    # first step: imp = score = -g*m; the two smallest nonzero |imp| go
    s = -g
    order = s.abs().argsort(stable=True)
    gone = [int(i) for i in order if s[i] != 0][:2]
    assert r.pruned == 2 and set(torch.nonzero(arena.mask == 0).flatten().tolist()) == set(gone)
    assert arena.grad.eq(0).all() and arena.sq.eq(0).all()
    imp1 = arena.imp.clone()
    arena.grad.copy_(torch.ones(20))
    arena.step("taylor", ema=0.4, ratio=0.1)
    live = imp1 != 0
    want = (0.4 * -torch.ones(20) + 0.6 * imp1) * live
    kept = arena.mask != 0
    torch.testing.assert_close(arena.imp[kept], want[kept])


def test_step_prunes_zero_score_units_and_taylor2():
    arena = K.ScoreArena([("a", 6, 1)])
    arena.grad.copy_(torch.tensor([0.0, 1.0, -2.0, 3.0, 0.0, 5.0]))
    arena.sq.copy_(torch.tensor([0.0, 2.0, 4.0, 0.0, 0.0, 1.0]))
    r = arena.step("taylor2", ratio=0.0)
    # taylor2 = -g + 0.5*sq = [0, 0, 4, -3, 0, -4.5]: units 0, 1, 4 score exactly 0 -> pruned with k = 0
    assert r.pruned == 3 and arena.mask.tolist() == [0, 0, 1, 1, 0, 1]
    torch.testing.assert_close(arena.imp, torch.tensor([0.0, 0.0, 4.0, -3.0, 0.0, -4.5]))
    # no new gradient: with ema 0.5 the importance halves, stays nonzero, nothing more goes
    assert arena.step("taylor2", ema=0.5, ratio=0.0).pruned == 0
    torch.testing.assert_close(arena.imp, torch.tensor([0.0, 0.0, 2.0, -1.5, 0.0, -2.25]))


def test_geometric_survival():
    arena = K.ScoreArena([("a", 5000, 1)])
    steps, r_epoch = 10, 0.5
    for _ in range(steps):
        arena.grad.copy_(torch.rand(5000) + 0.1)
        arena.step("taylor", ema=0.5, ratio=r_epoch / steps)
    surv = arena.n_live() / 5000
    assert abs(surv - (1 - r_epoch / steps) ** steps) < 2e-3
    assert abs(surv - math.exp(-r_epoch)) < 0.02


def test_state_dict_round_trip_and_errors():
    a = K.ScoreArena([("a", 4, 1)])
    a.grad.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    a.step("taylor", k=1)
    st = a.state_dict()
    b = K.ScoreArena([("a", 4, 1)])
    b.load_state_dict(st)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.imp, b.imp) and b.steps == 1
    with pytest.raises(ValueError, match="does not match"):
        K.ScoreArena([("a", 5, 1)]).load_state_dict(st)
    with pytest.raises(ValueError, match="exactly one of ratio or k"):
        a.step("taylor")
    with pytest.raises(ValueError, match="criterion must be one of"):
        a.step("bogus", k=1)
