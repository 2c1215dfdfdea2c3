"""Scores, block_reduce, EMA and activation statistics against float64 formulas."""
import pytest
import torch

import tsprune_kernels as K


@pytest.mark.parametrize("op", ["sum", "mean", "l2", "max"])
@pytest.mark.parametrize("block", [1, 3, 16])
def test_block_reduce(gen, op, block):
    s = torch.randn(5, 7, 6 * block, generator=gen, dtype=torch.float64)
    got = K.block_reduce(s, block, op)
    v = s.view(5, 7, 6, block)
    want = {"sum": v.sum(-1), "mean": v.mean(-1), "l2": v.pow(2).sum(-1).sqrt(), "max": v.max(-1).values}[op]
    torch.testing.assert_close(got, want)


def test_block_reduce_errors():
    with pytest.raises(ValueError, match="not divisible by block 4"):
        K.block_reduce(torch.ones(10), 4)
    with pytest.raises(ValueError, match="op must be one of"):
        K.block_reduce(torch.ones(8), 2, "median")


def test_first_and_second_order_scores(gen):
    g = torch.randn(50, generator=gen, dtype=torch.float64)
    sq = torch.rand(50, generator=gen, dtype=torch.float64)
    m = (torch.rand(50, generator=gen) > 0.5).double()
    torch.testing.assert_close(K.taylor_score(g, m), -g * m)
    torch.testing.assert_close(K.taylor2_score(g, sq), -g + 0.5 * sq)
    f = K.fisher_score(sq)
    torch.testing.assert_close(f, sq)
    assert f.data_ptr() != sq.data_ptr()
    with pytest.raises(ValueError, match="shapes differ"):
        K.taylor_score(g, m[:3])


@pytest.mark.parametrize("block", [1, 4])
def test_magnitude_and_wanda(gen, block):
    w = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    rows = K.magnitude_score(w, 0, block)
    cols = K.magnitude_score(w, 1, block)
    torch.testing.assert_close(rows, torch.stack([w[i : i + block].norm() for i in range(0, 12, block)]))
    torch.testing.assert_close(cols, torch.stack([w[:, j : j + block].norm() for j in range(0, 20, block)]))
    x = torch.randn(3, 9, 20, generator=gen, dtype=torch.float64)
    acc = torch.zeros(20, dtype=torch.float64)
    K.act_sq_accumulate_(x[:2], acc)
    K.act_sq_accumulate_(x[2:], acc)
    torch.testing.assert_close(acc, x.reshape(-1, 20).pow(2).sum(0))
    per = x.reshape(-1, 20).norm(dim=0) * w.norm(dim=0)
    torch.testing.assert_close(K.wanda_score(acc, w, block), per.view(-1, block).sum(-1))


def test_act_sq_fp32_accumulation_of_half_inputs(backend, gen):
    x = torch.randn(4, 33, 17, generator=gen).to(torch.bfloat16)
    acc = torch.zeros(17)
    K.act_sq_accumulate_(x, acc)
    torch.testing.assert_close(acc.double(), x.double().reshape(-1, 17).pow(2).sum(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="17 channels"):
        K.act_sq_accumulate_(x, torch.zeros(3))


def test_ema_update(gen):
    imp = torch.randn(9, generator=gen, dtype=torch.float64)
    s = torch.randn(9, generator=gen, dtype=torch.float64)
    want = 0.3 * s + 0.7 * imp
    out = K.ema_update_(imp, s, 0.3)
    assert out.data_ptr() == imp.data_ptr()
    torch.testing.assert_close(imp, want)
    with pytest.raises(ValueError, match=r"ema must be in \[0, 1\]"):
        K.ema_update_(imp, s, 1.5)
