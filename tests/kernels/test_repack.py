"""repack is exact (torch.equal) against index_select for every dtype, and never aliases."""
import pytest
import torch

import tsprune_kernels as K

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool]


def _rand(gen, shape, dtype):
    t = torch.randn(shape, generator=gen) * 50
    return (t > 0) if dtype == torch.bool else t.to(dtype)


def _keep(gen, n, frac=0.5, none=False):
    if none:
        return None
    idx = torch.randperm(n, generator=gen)[: max(1, int(n * frac))]
    return idx.sort().values


@pytest.mark.parametrize("dtype", DTYPES)
def test_repack_exact(backend, gen, dtype):
    shapes = [(77, 123), (5,), (6, 10, 3), (1, 1), (64, 64)]
    ts = [_rand(gen, s, dtype) for s in shapes]
    rows = [_keep(gen, s[0], none=(i == 3)) for i, s in enumerate(shapes)]
    cols = [None if len(s) == 1 else _keep(gen, s[1], frac=0.3, none=(i == 4)) for i, s in enumerate(shapes)]
    out = K.repack(ts, rows, cols)
    for t, r, c, o in zip(ts, rows, cols, out):
        want = t if r is None else t.index_select(0, r)
        want = want if c is None else want.index_select(1, c)
        assert o.dtype == t.dtype and o.is_contiguous()
        assert torch.equal(o, want)
        assert o.data_ptr() != t.data_ptr()


def test_repack_unsorted_and_repeated_indices_and_noncontiguous(backend, gen):
    t = torch.randn(20, 30, generator=gen).t()  # non-contiguous [30, 20]
    r = torch.tensor([5, 1, 1, 29])
    c = torch.tensor([19, 0, 7])
    (o,) = K.repack([t], [r], [c])
    assert torch.equal(o, t[r][:, c])


def test_repack_all_kept_is_a_copy(backend, gen):
    t = torch.randn(4, 4, generator=gen)
    (o,) = K.repack([t], [None], [None])
    assert torch.equal(o, t) and o.data_ptr() != t.data_ptr()


def test_repack_errors():
    t = torch.randn(4, 5)
    with pytest.raises(IndexError, match="index 5 out of range for size 4"):
        K.repack([t], [torch.tensor([0, 5])], [None])
    with pytest.raises(IndexError, match="index -1 out of range"):
        K.repack([t], [None], [torch.tensor([-1])])
    with pytest.raises(TypeError, match="LongTensor"):
        K.repack([t], [torch.tensor([0.0])], [None])
    with pytest.raises(ValueError, match="1-D .* keep_cols"):
        K.repack([torch.ones(3)], [None], [torch.tensor([0])])
    with pytest.raises(ValueError, match="1 tensors but 2 keep_rows"):
        K.repack([t], [None, None], [None])
