"""global_kth_smallest against cat + kthvalue; prune_lowest_ against a sort-based oracle."""
import pytest
import torch

from _oracles import prune_oracle
from hypothesis import given, settings, strategies as st

import tsprune_kernels as K


def _tensors(gen, sizes, dtype, zeros=0.1, dups=True):
    out = []
    for s in sizes:
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        t[torch.rand(s, generator=gen) < zeros] = 0.0
        if dups and s > 3:
            t[1] = t[0]
            t[2] = -t[0]
        out.append(t.to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ignore_zeros", [True, False])
def test_kth_matches_cat_kthvalue(backend, gen, dtype, ignore_zeros):
    ts = _tensors(gen, [123, 77, 5, 1, 300], dtype)
    flat = torch.cat([t.reshape(-1) for t in ts]).to(torch.float64 if dtype == torch.float64 else torch.float32).abs()
    if ignore_zeros:
        flat = flat[flat != 0]
    for k in [1, 2, 3, flat.numel() // 2, flat.numel() - 1, flat.numel()]:
        got = K.global_kth_smallest(ts, k, ignore_zeros=ignore_zeros)
        assert float(got) == float(flat.kthvalue(k).values), k


def test_kth_multidim_inputs(backend, gen):
    ts = [torch.randn(5, 123, 7, generator=gen), torch.randn(3, 3, generator=gen)]
    flat = torch.cat([t.reshape(-1) for t in ts]).abs()
    for k in (1, 500, flat.numel()):
        assert float(K.global_kth_smallest(ts, k)) == float(flat.kthvalue(k).values)


def test_kth_errors(backend):
    with pytest.raises(ValueError, match=r"k=4 out of range \[1, 3\]"):
        K.global_kth_smallest([torch.tensor([0.0, 1.0, 2.0, -3.0])], 4)
    with pytest.raises(ValueError, match="out of range"):
        K.global_kth_smallest([torch.tensor([1.0])], 0)
    with pytest.raises(ValueError, match="non-finite"):
        K.global_kth_smallest([torch.tensor([1.0, float("nan")])], 1)
    with pytest.raises(TypeError, match="one float dtype"):
        K.global_kth_smallest([torch.ones(2), torch.ones(2, dtype=torch.float64)], 1)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=5), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_kth_sweep(sizes, seed, data):
    gen = torch.Generator().manual_seed(seed)
    ts = _tensors(gen, sizes, torch.float32, zeros=0.3)
    flat = torch.cat(ts).abs()
    flat = flat[flat != 0]
    if flat.numel() == 0:
        return
    k = data.draw(st.integers(1, flat.numel()))
    assert float(K.global_kth_smallest(ts, k)) == float(flat.kthvalue(k).values)


@pytest.mark.parametrize("k", [0, 1, 7, 50, 10_000])
def test_prune_lowest_matches_oracle(backend, gen, k):
    n = 257
    mask = (torch.rand(n, generator=gen) > 0.2).float()
    imp = torch.randn(n, generator=gen)
    imp[torch.rand(n, generator=gen) < 0.05] = 0.0
    imp[10:20] = 0.125  # ties: lower index first
    imp[30:35] = -0.125
    m_ref, i_ref, n_ref = prune_oracle(mask, imp, k)
    got = K.prune_lowest_(mask, k, imp=imp)
    assert got == n_ref
    assert torch.equal(mask, m_ref) and torch.equal(imp, i_ref)


def test_prune_lowest_on_arena(backend):
    arena = K.ScoreArena([("a", 4, 1), ("b", 3, 2)])
    arena.imp.copy_(torch.tensor([0.5, -0.1, 0.0, 2.0, 0.3, -0.2, 1.0]))
    arena.mask[6] = 0  # already pruned: not live, not counted
    assert K.prune_lowest_(arena, 2) == 3  # the zero + the two smallest live |imp|
    assert arena.mask.tolist() == [1, 0, 0, 1, 1, 0, 0]
    assert arena.imp[[1, 2, 5]].eq(0).all()


def test_prune_lowest_rejects_bad_input():
    with pytest.raises(ValueError, match="k must be >= 0"):
        K.prune_lowest_(torch.ones(3), -1, imp=torch.ones(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        K.prune_lowest_(torch.ones(2), 1, imp=torch.tensor([1.0, float("inf")]))
