"""masked_linear against float64 autograd of the formula, on fresh random inputs."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import tsprune_kernels as K
import _oracles as R

# (dtype, atol, rtol) of the fast path vs an fp64 oracle. Half types are judged against the error
# of naive low-precision torch code on the same inputs (the kernel may not be worse than 2x + eps).
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-11, 1e-11)}


def _masks(gen, n_units, kind, dtype=torch.float32):
    if kind is None:
        return None
    if kind == "binary":
        m = (torch.rand(n_units, generator=gen) > 0.35).to(dtype)
        m[0] = 0.0  # always at least one zero entry: gradients at zeros must be exact too
        return m
    m = torch.rand(n_units, generator=gen).to(dtype) * 2 - 0.5  # non-binary, includes negatives
    m[-1] = 0.0
    return m


def _case(gen, shape, k, n, bi, bo, kind_in, kind_out, bias=True):
    x = torch.randn(*shape, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=gen, dtype=torch.float64) if bias else None
    mi = _masks(gen, k // bi, kind_in, torch.float64)
    mo = _masks(gen, n // bo, kind_out, torch.float64)
    gy = torch.randn(*shape, n, generator=gen, dtype=torch.float64)
    return x, w, b, mi, mo, gy


def _oracle(x, w, b, mi, mo, bi, bo, gy, need_w=False):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, mi, mo)]
    xx, ww, bb, mmi, mmo = leaves
    if not need_w:
        ww.requires_grad_(False)
        if bb is not None:
            bb.requires_grad_(False)
    y = R.masked_linear(xx, ww, bb, mmi, mmo, bi, bo)
    y.backward(gy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


SHAPES = [((5, 123), 77, 45, 7, 5), ((3, 7), 64, 96, 16, 32), ((1,), 12, 10, 1, 1), ((2, 3, 5), 30, 18, 3, 6)]


@pytest.mark.parametrize("shape,k,n,bi,bo", SHAPES)
@pytest.mark.parametrize("kinds", [("binary", "binary"), ("real", "real"), (None, "binary"), ("real", None), (None, None)])
def test_forward_backward_fp32_vs_fp64(backend, gen, shape, k, n, bi, bo, kinds):
    x, w, b, mi, mo, gy = _case(gen, shape, k, n, bi, bo, *kinds)
    y_ref, (dx_ref, _, _, dmi_ref, dmo_ref) = _oracle(x, w, b, mi, mo, bi, bo, gy)
    f = lambda t: None if t is None else t.float().detach().clone().requires_grad_(True)  # noqa: E731
    xx, mmi, mmo = f(x), f(mi), f(mo)
    y = K.masked_linear(xx, w.float(), b.float(), mmi, mmo, bi, bo)
    y.backward(gy.float())
    atol, rtol = TOL[torch.float32]
    scale = max(1.0, float(y_ref.abs().max()))
    torch.testing.assert_close(y.double(), y_ref, atol=atol * scale, rtol=rtol)
    torch.testing.assert_close(xx.grad.double(), dx_ref, atol=atol * scale, rtol=rtol)
    # mask gradients sum over all tokens of a unit: tolerance grows with the number of terms
    terms = x.numel() // k * max(bi, bo)
    if mi is not None:
        torch.testing.assert_close(mmi.grad.double(), dmi_ref, atol=atol * terms**0.5 * scale, rtol=1e-4)
    if mo is not None:
        torch.testing.assert_close(mmo.grad.double(), dmo_ref, atol=atol * terms**0.5 * scale, rtol=1e-4)


@pytest.mark.parametrize("need_w", [True, False])
def test_fp64_exact_all_grads(backend, gen, need_w):
    x, w, b, mi, mo, gy = _case(gen, (4, 9), 24, 20, 4, 5, "real", "binary")
    y_ref, grads_ref = _oracle(x, w, b, mi, mo, 4, 5, gy, need_w=need_w)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, mi, mo)]
    if not need_w:
        leaves[1].requires_grad_(False)
        leaves[2].requires_grad_(False)
    y = K.masked_linear(*leaves, 4, 5)
    y.backward(gy)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for got, ref in zip([t.grad for t in leaves], grads_ref):
        if ref is None:
            continue
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_no_worse_than_naive(backend, gen, dtype):
    """Error vs fp64, judged against naive low-precision torch code on the same inputs.

    Pooled over 8 fresh draws: the max error of one draw's 12 mask entries is too noisy to compare
    (a single-draw max-vs-max test at 2x failed ~1% of seeds although the kernel's median error is
    below naive's). Over 800 draws the kernel's pooled RMS reached 1.36x naive and its max 2.26x,
    so the bounds are 2x (RMS) and 4x (max), plus a tiny absolute slack."""
    names = ["y", "dx", "dmask_in", "dmask_out"]
    sq = {n: [0.0, 0.0] for n in names}  # sum of squared errors: kernel, naive
    mx = {n: [0.0, 0.0, 0.0] for n in names}  # max error: kernel, naive; max |ref|
    for _ in range(8):
        x, w, b, mi, mo, gy = _case(gen, (5, 33), 77, 48, 7, 4, "binary", "real")
        y_ref, (dx_ref, _, _, dmi_ref, dmo_ref) = _oracle(x, w, b, mi, mo, 7, 4, gy)
        # naive low-precision code: autograd of the formula in `dtype`
        h = lambda t: None if t is None else t.to(dtype).detach().clone().requires_grad_(True)  # noqa: E731
        xn, min_, mon = h(x), h(mi), h(mo)
        yn = R.masked_linear(xn, w.to(dtype), b.to(dtype), min_, mon, 7, 4)
        yn.backward(gy.to(dtype))
        xk, mik, mok = h(x), mi.float().clone().requires_grad_(True), mo.float().clone().requires_grad_(True)
        yk = K.masked_linear(xk, w.to(dtype), b.to(dtype), mik, mok, 7, 4)
        assert yk.dtype == dtype
        yk.backward(gy.to(dtype))
        got = [yk, xk.grad, mik.grad, mok.grad]
        naive = [yn, xn.grad, min_.grad, mon.grad]
        for n, g, v, ref in zip(names, got, naive, [y_ref, dx_ref, dmi_ref, dmo_ref]):
            for j, t in enumerate((g, v)):
                e = t.double() - ref
                sq[n][j] += e.square().sum().item()
                mx[n][j] = max(mx[n][j], e.abs().max().item())
            mx[n][2] = max(mx[n][2], ref.abs().max().item())
    for n in names:
        slack = 1e-4 * mx[n][2]
        assert sq[n][0] ** 0.5 <= 2 * sq[n][1] ** 0.5 + slack, (n, "rms", sq[n])
        assert mx[n][0] <= 4 * mx[n][1] + slack, (n, "max", mx[n])


def test_accumulators_match_per_sample_loop(backend, gen):
    """grad_acc == total mask gradient; sq_acc == sum_i g_i**2 with g_i from a per-sample autograd loop."""
    b_, t_, k, n, bi, bo = 6, 11, 20, 12, 2, 3
    x, w, b, mi, mo, gy = _case(gen, (b_, t_), k, n, bi, bo, "binary", "real")
    gi_in, gi_out = [], []
    for i in range(b_):
        _, grads = _oracle(x[i : i + 1], w, b, mi, mo, bi, bo, gy[i : i + 1])
        gi_in.append(grads[3])
        gi_out.append(grads[4])
    gi_in, gi_out = torch.stack(gi_in), torch.stack(gi_out)
    acc_in = torch.full((k // bi,), 0.5)  # accumulators ADD to what is there
    acc_out = torch.zeros(n // bo)
    sq_in = torch.ones(k // bi)
    sq_out = torch.zeros(n // bo)
    mik = mi.float().requires_grad_(True)
    mok = mo.float().requires_grad_(True)
    y = K.masked_linear(x.float(), w.float(), b.float(), mik, mok, bi, bo,
                        grad_acc_in=acc_in, grad_acc_out=acc_out, sq_acc_in=sq_in, sq_acc_out=sq_out)
    y.backward(gy.float())
    assert mik.grad is None and mok.grad is None  # gradients went to the accumulators only
    tol = dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(acc_in.double(), 0.5 + gi_in.sum(0), **tol)
    torch.testing.assert_close(acc_out.double(), gi_out.sum(0), **tol)
    torch.testing.assert_close(sq_in.double(), 1.0 + gi_in.square().sum(0), **tol)
    torch.testing.assert_close(sq_out.double(), gi_out.square().sum(0), **tol)


def test_frozen_weight_computes_no_weight_grad(backend, gen):
    x, w, b, mi, mo, gy = _case(gen, (3, 5), 16, 8, 1, 1, "binary", "binary")
    w = w.float()
    mik = mi.float().requires_grad_(True)
    y = K.masked_linear(x.float(), w, None, mik, None)
    y.backward(gy.float())
    assert w.grad is None and mik.grad is not None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mask_in=torch.ones(5)), r"mask_in has shape \(5,\); expected \(8,\)"),
        (dict(mask_in=torch.ones(3), block_in=3), r"8 input features are not divisible by mask_in block 3"),
        (dict(mask_out=torch.ones(2), block_out=4), r"mask_out has shape \(2,\); expected \(1,\)"),
        (dict(block_out=0), r"positive int"),
        (dict(mask_in=torch.ones(8, dtype=torch.long)), r"float tensor"),
    ],
)
def test_bad_masks_raise(kwargs, match):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        K.masked_linear(x, w, **kwargs)


def test_bad_operands_raise():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="x has 7 features"):
        K.masked_linear(torch.randn(2, 7), w)
    with pytest.raises(TypeError, match="dtype mismatch"):
        K.masked_linear(x, w.double())
    with pytest.raises(ValueError, match="on meta"):
        K.masked_linear(x, w, mask_in=torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match=r"grad_acc_in has shape \(3,\)"):
        K.masked_linear(x, w, mask_in=torch.ones(8), grad_acc_in=torch.zeros(3))
    with pytest.raises(ValueError, match="without the mask"):
        K.masked_linear(x, w, grad_acc_out=torch.zeros(4))
    with pytest.raises(TypeError, match="float32 or float64"):
        K.masked_linear(x, w, mask_out=torch.ones(4), sq_acc_out=torch.zeros(4, dtype=torch.float16))


def test_non_contiguous_input_is_documented_copy(backend, gen):
    x = torch.randn(16, 6, generator=gen).t()  # [6, 16] non-contiguous
    w = torch.randn(5, 16, generator=gen)
    m = (torch.rand(16, generator=gen) > 0.5).float()
    torch.testing.assert_close(K.masked_linear(x, w, mask_in=m), R.masked_linear(x, w, mask_in=m))


def test_nan_gradient_propagates_and_arena_refuses(backend):
    arena = K.ScoreArena([("lin.in", 8, 1)])
    x = torch.randn(2, 8, requires_grad=True)
    w = torch.randn(3, 8)
    y = K.masked_linear(x, w, mask_in=arena.mask_view("lin.in"), grad_acc_in=arena.grad_view("lin.in"))
    g = torch.ones_like(y)
    g[0, 0] = float("nan")
    y.backward(g)
    assert torch.isnan(arena.grad).any()
    with pytest.raises(ValueError, match="non-finite .* lin.in"):
        arena.step("taylor", ratio=0.1)


def test_torch_compile_forward_backward(backend, gen):
    lin = torch.nn.Linear(12, 10)
    mi = (torch.rand(6, generator=gen) > 0.3).float().requires_grad_(True)
    mo = torch.rand(10, generator=gen)
    mo[::3] = 0.0  # zero output units: on cpp the forward returns y_pre[:, Z] (data-dependent width)
    mo.requires_grad_(True)

    def f(x):
        return torch.relu(K.masked_linear(x, lin.weight, lin.bias, mi, mo, 2, 1)).sum()

    x = torch.randn(3, 4, 12, generator=gen)
    ref = f(x)
    ref.backward()
    g_ref = (mi.grad.clone(), mo.grad.clone())
    mi.grad = mo.grad = None
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    got.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close((mi.grad, mo.grad), g_ref)


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    units_in=st.integers(1, 9), bi=st.sampled_from([1, 2, 3, 8]),
    units_out=st.integers(1, 9), bo=st.sampled_from([1, 4, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_shape_sweep(lead, units_in, bi, units_out, bo, seed):
    gen = torch.Generator().manual_seed(seed)
    k, n = units_in * bi, units_out * bo
    x, w, b, mi, mo, gy = _case(gen, tuple(lead), k, n, bi, bo, "binary", "real")
    y_ref, (dx_ref, _, _, dmi_ref, dmo_ref) = _oracle(x, w, b, mi, mo, bi, bo, gy)
    leaves = [t.clone().requires_grad_(True) for t in (x, mi, mo)]
    y = K.masked_linear(leaves[0], w, b, leaves[1], leaves[2], bi, bo)
    y.backward(gy)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for got, ref in zip([t.grad for t in leaves], [dx_ref, dmi_ref, dmo_ref]):
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)


# -- v2b: y_pre of the zero output units kept by the forward (C++ backend) ------------------------

def _half_zero_masks(gen, units, dtype=torch.float32):
    """0/1 mask with half of the units exactly zero (random positions), plus one non-binary entry."""
    m = torch.ones(units, dtype=dtype)
    m[torch.randperm(units, generator=gen)[: units // 2]] = 0.0
    live = m.nonzero().flatten()
    m[live[0]] = 0.75
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,k,n,bi,bo,sq", [
    ((6, 37), 96, 160, 1, 1, False),   # block 1: zero channels scattered (the benchmark's case)
    ((6, 37), 96, 160, 1, 1, True),    # with per-sample squares (taylor2)
    ((3, 50), 64, 96, 8, 4, True),     # blocks: zero runs of block_out channels
    ((2, 1001), 40, 37, 2, 1, False),  # long samples: parallel row segments; odd N
])
def test_half_zero_units_exact_at_every_unit(gen, dtype, shape, k, n, bi, bo, sq, monkeypatch):
    """50% zero output AND input units, fresh random inputs: the C++ backend's gradients (mask
    gradients through the accumulators, dx) match float64 autograd of the formula at EVERY unit,
    the zero ones included, and the forward really kept y_pre of the zero output channels
    (so the backward took the no-recompute path)."""
    from tsprune_kernels import _backend
    if not _backend.cpp_available():
        pytest.skip(f"C++ extension not built: {_backend._C_ERROR}")
    monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", "cpp")
    kept = []
    real_keep = _backend._C.masked_linear_fwd_keep

    def spy(*a):
        y, ypz = real_keep(*a)
        kept.append(tuple(ypz.shape))
        return y, ypz

    monkeypatch.setattr(_backend._C, "masked_linear_fwd_keep", spy)
    x = torch.randn(*shape, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    gy = torch.randn(*shape, n, generator=gen, dtype=torch.float64)
    mi = _half_zero_masks(gen, k // bi, torch.float64)
    mo = _half_zero_masks(gen, n // bo, torch.float64)
    # float64 reference, per sample (for the squares), from the inputs rounded to `dtype`
    xd, wd, bd, gyd = (t.to(dtype).double() for t in (x, w, b, gy))
    per_in, per_out, dx_ref = [], [], []
    for i in range(shape[0]):
        _, (dxi, _, _, gi, go) = _oracle(xd[i : i + 1], wd, bd, mi, mo, bi, bo, gyd[i : i + 1])
        per_in.append(gi)
        per_out.append(go)
        dx_ref.append(dxi)
    per_in, per_out, dx_ref = torch.stack(per_in), torch.stack(per_out), torch.cat(dx_ref)
    acc_in, acc_out = torch.zeros(k // bi, dtype=torch.float64), torch.zeros(n // bo, dtype=torch.float64)
    sq_in = torch.zeros(k // bi, dtype=torch.float64) if sq else None
    sq_out = torch.zeros(n // bo, dtype=torch.float64) if sq else None
    xx = x.to(dtype).requires_grad_(True)
    mik, mok = mi.float().requires_grad_(True), mo.float().requires_grad_(True)
    y = K.masked_linear(xx, w.to(dtype), b.to(dtype), mik, mok, bi, bo, grad_acc_in=acc_in,
                        grad_acc_out=acc_out, sq_acc_in=sq_in, sq_acc_out=sq_out)
    y.backward(gy.to(dtype))
    zero_out = int((mo == 0).sum())
    assert kept == [(x.numel() // k, zero_out * bo)]  # y_pre of exactly the zero channels was kept
    # The reference sees the same rounded inputs; what is left is fp32 accumulation (fp32) and the
    # rounding of the GEMM outputs y, y_pre[:, Z], dxm to 8 bits before they are summed (bf16).
    eps = 2e-5 if dtype == torch.float32 else 2e-2
    for got, ref, m in ((acc_in, per_in.sum(0), mi), (acc_out, per_out.sum(0), mo)):
        scale = float(ref.abs().max())
        err = (got - ref).abs()
        assert float(err.max()) <= eps * scale, (got, ref)
        zero_units = m == 0
        assert float(ref[zero_units].abs().max()) > 0.05 * scale  # pruned units have real gradients
        assert float(err[zero_units].max()) <= eps * scale, (got[zero_units], ref[zero_units])
    if sq:
        for got, ref in ((sq_in, per_in.square().sum(0)), (sq_out, per_out.square().sum(0))):
            torch.testing.assert_close(got, ref, atol=2 * eps * float(ref.abs().max()), rtol=2 * eps)
    scale = float(dx_ref.abs().max())
    torch.testing.assert_close(xx.grad.double().reshape(dx_ref.shape), dx_ref,
                               atol=(1e-5 if dtype == torch.float32 else 2e-2) * scale, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_kept_zero_pre_matches_recompute_path(gen, dtype):
    """The two C++ output-side paths for zero units agree: y_pre[:, Z] kept by the forward vs the
    restricted recompute (no kept columns); y is identical to the plain forward's on the zero
    channels (y_pre * m) and elsewhere close (same GEMM, different fold of m_out)."""
    from tsprune_kernels import _backend
    if not _backend.cpp_available():
        pytest.skip(f"C++ extension not built: {_backend._C_ERROR}")
    C = _backend._C
    T, k, n, bo = 96, 48, 40, 2
    x = torch.randn(T, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    gy = torch.randn(T, n, generator=gen).to(dtype)
    mo = torch.rand(n // bo, generator=gen) + 0.5
    mo[::3] = 0.0
    mo[1] = float("nan")  # not finite: a zero unit too
    y0 = C.masked_linear_fwd(x, w, b, None, mo, 1, bo)
    y1, ypz = C.masked_linear_fwd_keep(x, w, b, None, mo, 1, bo)
    zu = (~(mo.abs() >= 1e-20)).nonzero().flatten()
    zc = (zu[:, None] * bo + torch.arange(bo)).flatten()
    assert ypz.shape == (T, zc.numel()) and ypz.dtype == dtype
    ref_pre = (x.double() @ w.double().t() + b.double())[:, zc]
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 3e-2)
    torch.testing.assert_close(ypz.double(), ref_pre, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(y1.double(), y0.double(), atol=tol * 10, rtol=tol, equal_nan=True)
    args = (1, bo, T // 4, [False, False, False, False, True])
    acc_a, sq_a = torch.zeros(n // bo, dtype=torch.float64), torch.zeros(n // bo, dtype=torch.float64)
    acc_b, sq_b = torch.zeros_like(acc_a), torch.zeros_like(sq_a)
    ra = C.masked_linear_bwd(gy, x, y1, w, b, None, mo, *args, None, None, None, None, ypz)
    rb = C.masked_linear_bwd(gy, x, y1, w, b, None, mo, *args, None, acc_b, None, sq_b)
    C.masked_linear_bwd(gy, x, y1, w, b, None, mo, 1, bo, T // 4, [False] * 5, None, acc_a, None, sq_a, ypz)
    torch.testing.assert_close(ra[4].double(), rb[4].double(), atol=tol * 100, rtol=tol * 10)
    torch.testing.assert_close(acc_a, acc_b, atol=tol * 100, rtol=tol * 10)
    torch.testing.assert_close(sq_a, sq_b, atol=tol * 1000, rtol=tol * 10)
    assert torch.isfinite(ra[4]).all()  # the NaN mask entry's unit is recomputed, not y / m
    with pytest.raises(RuntimeError, match="y_pre_zero must be"):
        C.masked_linear_bwd(gy, x, y1, w, b, None, mo, *args, None, None, None, None, ypz[:, 1:])


def test_zero_pre_kept_only_when_a_backward_wants_it(gen, monkeypatch):
    """No kept columns under no_grad, without mask_out, or when nothing needs the mask_out
    gradient; kept with an accumulator even if mask_out itself does not require grad."""
    from tsprune_kernels import _backend
    if not _backend.cpp_available():
        pytest.skip(f"C++ extension not built: {_backend._C_ERROR}")
    monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", "cpp")
    calls = []
    real_keep = _backend._C.masked_linear_fwd_keep
    monkeypatch.setattr(_backend._C, "masked_linear_fwd_keep", lambda *a: calls.append(1) or real_keep(*a))
    x = torch.randn(4, 5, 8, generator=gen, requires_grad=True)
    w = torch.randn(6, 8, generator=gen)
    mo = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 1.0])
    with torch.no_grad():
        K.masked_linear(x, w, mask_out=mo.clone().requires_grad_(True))
    K.masked_linear(x, w, mask_out=mo)  # mask_out needs no gradient
    K.masked_linear(x.detach(), w, mask_out=mo, grad_acc_out=torch.zeros(6))  # nothing differentiable
    assert calls == []
    K.masked_linear(x, w, mask_out=mo.clone().requires_grad_(True)).sum().backward()
    K.masked_linear(x, w, mask_out=mo, grad_acc_out=torch.zeros(6)).sum().backward()
    assert calls == [1, 1]


def test_custom_ops_opcheck(gen):
    """torch.library.opcheck of both ops (schema, fake impls incl. the data-dependent y_pre_zero
    width, autograd registration), on the backend under test by default (cpp when built)."""
    x = torch.randn(12, 8, generator=gen)
    w = torch.randn(6, 8, generator=gen)
    b = torch.randn(6, generator=gen)
    mi = torch.tensor([1.0, 0.0, 0.5, 1.0])
    mo = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 1.0])
    for keep in (True, False):
        torch.library.opcheck(torch.ops.tsprune.masked_linear_fwd.default, (x, w, b, mi, mo, 2, 1, keep))
    _, ypz = torch.ops.tsprune.masked_linear_fwd(x, w, b, mi, mo, 2, 1, True)
    y = torch.randn(12, 6, generator=gen)
    gy = torch.randn(12, 6, generator=gen)
    for z in (ypz, None):
        torch.library.opcheck(
            torch.ops.tsprune.masked_linear_bwd.default,
            (gy, x, y, w, b, mi, mo, 2, 1, 3, [True, False, True, True, True], None, None, None, None, z),
        )


def test_kept_zero_pre_buffers_reused_safely(gen, monkeypatch):
    """y_pre_zero buffers >= 4 MiB come from a small process-wide cache (TSPRUNE_CPU_CACHE_MB):
    several forwards alive at once must get distinct buffers, and buffers handed out again after a
    backward must hold the new step's values. Gradients vs float64 at every unit, over 3 steps."""
    from tsprune_kernels import _backend
    if not _backend.cpp_available():
        pytest.skip(f"C++ extension not built: {_backend._C_ERROR}")
    monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", "cpp")
    T, k, n = 4096, 32, 512  # y_pre_zero: 4096 x 256 fp32 = 4 MiB (cached size)
    w = torch.randn(n, k, generator=gen) / k**0.5
    mo = _half_zero_masks(gen, n).requires_grad_(True)
    x0 = torch.randn(T, k, generator=gen)
    _, z = _backend._C.masked_linear_fwd_keep(x0, w, None, None, mo.detach(), 1, 1)
    ptr = z.data_ptr()
    del z  # back to the cache
    _, z = _backend._C.masked_linear_fwd_keep(x0, w, None, None, mo.detach(), 1, 1)
    if os.environ.get("TSPRUNE_CPU_CACHE_MB", "").strip() != "0":
        assert z.data_ptr() == ptr  # the cache is in use, so the steps below exercise reuse
    del z
    for _step in range(3):
        xs = [torch.randn(8, T // 8, k, generator=gen) for _ in range(3)]
        gys = [torch.randn(8, T // 8, n, generator=gen) for _ in range(3)]
        ys = [K.masked_linear(x, w, None, None, mo) for x in xs]  # three y_pre_zero alive at once
        mo.grad = None
        torch.autograd.backward(ys, gys)
        want = sum((gy.double() * F.linear(x.double(), w.double())).sum((0, 1)) for x, gy in zip(xs, gys))
        torch.testing.assert_close(mo.grad.double(), want, atol=2e-5 * float(want.abs().max()), rtol=0)
