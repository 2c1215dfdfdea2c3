"""The Triton kernels (tsprune_kernels/triton/) against float64 references, with the backend forced.

Runs only where the kernels can execute: on a CUDA GPU (tensors on cuda), or anywhere under the
Triton interpreter (``TRITON_INTERPRET=1``, tensors on the CPU, small odd shapes; ~1 min on 2 cores):

    TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton.py

Otherwise the module is skipped with the reason. ``TSPRUNE_KERNELS_BACKEND=triton`` is forced for
every test, and masked_linear runs both of its paths (``fused``: masks inside Triton GEMMs; ``fold``:
masks folded into a weight copy + cuBLAS / torch GEMMs + streaming Triton reductions).

Tolerances (fp32 kernel vs the fp64 autograd oracle; scale = max(1, max |reference output|)):
    y, dx                 atol 2e-5 * scale, rtol 2e-5
    mask gradients        atol 2e-5 * sqrt(number of summed terms) * scale, rtol 1e-4
    taylor2 squares       atol / rtol 2e-4 (sums of squares of the above)
    bf16 / fp16           error <= 2 x (error of naive autograd in that dtype) + 1e-3 * max |ref|
                          + eps / 4 * max sum |terms| (cancellation-aware; see the test)
    selection, prune, repack: exact (==)

What the interpreter cannot check (the GPU suite, benchmarks/gpu_suite.sh, runs this module and the
whole kernel suite on CUDA for these):
    - native bf16 tl.dot: numpy has no bfloat16, so under the interpreter the kernels upcast bf16
      operands to fp32 before tl.dot (exact) and keep masked tiles in fp32; the wgmma bf16 path
      only runs on the GPU. The interpreter's fp32 -> bf16 cast truncates (a GPU rounds to
      nearest even), so under it the kernels round explicitly before their bf16 stores;
    - TF32 (input_precision follows torch.backends.cuda.matmul.allow_tf32, off by default);
    - atomics under real concurrency (the interpreter runs programs one after another), and the
      autotuner (one config under the interpreter; on GPU it re-runs kernels, with reset_to_zero);
    - compile-time limits (registers, shared memory, layouts): scripts/triton_aot_check.py compiles
      every kernel for sm_90 without a GPU;
    - the CUDA repack kernel (tsprune_kernels._C_cuda): only its indexing, by
      csrc/cuda/tests/repack_host_test.cu (scripts/nvcc_check.sh); the CUDA test below needs a GPU;
    - speed and memory: benchmarks/bench_gpu.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from _oracles import prune_oracle

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or the Triton interpreter (set TRITON_INTERPRET=1)",
                allow_module_level=True)
pytest.importorskip("triton", reason="Triton is not installed")

import tsprune_kernels as K  # noqa: E402
from tsprune_kernels import _backend  # noqa: E402
import _oracles as R  # noqa: E402

# Under the interpreter the kernels read host memory: CPU tensors. On a GPU: CUDA tensors.
DEV = torch.device("cpu" if INTERPRET else "cuda")


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", "triton")
    if _backend.triton_impl() is None:
        pytest.fail(f"Triton is installed but tsprune_kernels.triton did not import: {_backend._TRITON_ERROR}")


@pytest.fixture(params=["fused", "fold"])
def ml_path(request, monkeypatch):
    monkeypatch.setenv("TSPRUNE_TRITON_MASKED_LINEAR", request.param)
    return request.param


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _dev(t):
    return None if t is None else t.to(DEV)


def _mask(gen, units, kind):
    if kind is None:
        return None
    if kind == "binary":
        m = (torch.rand(units, generator=gen) > 0.35).double()
    else:  # real values, negatives, a tiny value (recomputed like a zero), exact zeros
        m = torch.rand(units, generator=gen).double() * 2 - 0.5
        if units > 2:
            m[1] = 1e-30
    m[0] = 0.0
    return m


def _case(gen, lead, k, n, bi, bo, kin, kout, bias=True):
    x = torch.randn(*lead, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=gen, dtype=torch.float64) if bias else None
    gy = torch.randn(*lead, n, generator=gen, dtype=torch.float64)
    return x, w, b, _mask(gen, k // bi, kin), _mask(gen, n // bo, kout), gy


def _oracle(x, w, b, mi, mo, bi, bo, gy, need_w=False):
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in (x, w, b, mi, mo)]
    if not need_w:
        leaves[1].requires_grad_(False)
        if leaves[2] is not None:
            leaves[2].requires_grad_(False)
    y = R.masked_linear(*leaves, bi, bo)
    y.backward(gy)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _close(got, ref, atol, rtol=2e-5):
    torch.testing.assert_close(got.detach().double().cpu(), ref, atol=atol, rtol=rtol)


# -- masked_linear ----------------------------------------------------------------------------

# (2, 13): one row tile; (5, 13) = 65 rows: three row tiles of 32 under the interpreter
SHAPES = [((2, 13), 40, 24, 1, 1), ((2, 13), 40, 24, 4, 8), ((2, 13), 40, 24, 8, 4), ((26,), 40, 24, 8, 1),
          ((3, 5), 21, 35, 7, 5), ((5, 13), 40, 72, 4, 8)]


@pytest.mark.parametrize("lead,k,n,bi,bo", SHAPES)
@pytest.mark.parametrize("kinds", [("binary", "real"), ("real", "binary"), (None, "real"), ("binary", None)])
def test_masked_linear_fp32(ml_path, gen, lead, k, n, bi, bo, kinds):
    x, w, b, mi, mo, gy = _case(gen, lead, k, n, bi, bo, *kinds)
    y_ref, (dx_ref, _, _, dmi_ref, dmo_ref) = _oracle(x, w, b, mi, mo, bi, bo, gy)
    f = lambda t: None if t is None else t.float().to(DEV).requires_grad_(True)  # noqa: E731
    xx, mmi, mmo = f(x), f(mi), f(mo)
    y = K.masked_linear(xx, _dev(w.float()), _dev(b.float()), mmi, mmo, bi, bo)
    y.backward(gy.float().to(DEV))
    scale = max(1.0, float(y_ref.abs().max()))
    _close(y, y_ref, 2e-5 * scale)
    _close(xx.grad, dx_ref, 2e-5 * scale)
    terms = x.numel() // k * max(bi, bo)
    if mi is not None:
        _close(mmi.grad, dmi_ref, 2e-5 * terms**0.5 * scale, 1e-4)
    if mo is not None:
        _close(mmo.grad, dmo_ref, 2e-5 * terms**0.5 * scale, 1e-4)


@pytest.mark.parametrize("lead,bi,bo", [((4, 7), 4, 8), ((28,), 1, 1), ((28,), 4, 1), ((7, 4), 1, 8),
                                        ((9, 7), 4, 8), ((70,), 1, 1)])
def test_accumulators_and_taylor2_squares(ml_path, gen, lead, bi, bo):
    """grad_acc += total mask gradient, sq_acc += sum_i g_i**2 (sample = first dim of x), against a
    per-sample fp64 autograd loop; covers one-token samples (in-register squares when block 1)."""
    k, n = 40, 24
    x, w, b, mi, mo, gy = _case(gen, lead, k, n, bi, bo, "binary", "real")
    gi_in, gi_out = [], []
    for i in range(lead[0]):
        _, g = _oracle(x[i : i + 1], w, b, mi, mo, bi, bo, gy[i : i + 1])
        gi_in.append(g[3])
        gi_out.append(g[4])
    gi_in, gi_out = torch.stack(gi_in), torch.stack(gi_out)
    acc_in = torch.full((k // bi,), 0.5, device=DEV)
    acc_out = torch.zeros(n // bo, device=DEV, dtype=torch.float64)  # fp64 accumulators are allowed
    sq_in = torch.ones(k // bi, device=DEV)
    sq_out = torch.zeros(n // bo, device=DEV)
    mik = mi.float().to(DEV).requires_grad_(True)
    mok = mo.float().to(DEV).requires_grad_(True)
    y = K.masked_linear(x.float().to(DEV), _dev(w.float()), _dev(b.float()), mik, mok, bi, bo,
                        grad_acc_in=acc_in, grad_acc_out=acc_out, sq_acc_in=sq_in, sq_acc_out=sq_out)
    y.backward(gy.float().to(DEV))
    assert mik.grad is None and mok.grad is None
    tol = dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(acc_in.double().cpu(), 0.5 + gi_in.sum(0), **tol)
    torch.testing.assert_close(acc_out.cpu(), gi_out.sum(0), **tol)
    torch.testing.assert_close(sq_in.double().cpu(), 1.0 + gi_in.square().sum(0), **tol)
    torch.testing.assert_close(sq_out.double().cpu(), gi_out.square().sum(0), **tol)


@pytest.mark.parametrize("which", ["x_only", "masks_only", "out_only", "weight_and_bias"])
def test_partial_gradients(ml_path, gen, which):
    """Each subset of gradients: dx without masks, mask gradients without dx (the input-side
    reduction without the dx store), the output side alone, and dweight / dbias."""
    bi, bo = 4, 3
    x, w, b, mi, mo, gy = _case(gen, (3, 5), 20, 12, bi, bo, "real", "binary")
    if which == "x_only":
        mi = mo = None
    if which == "out_only":
        mi = None
    y_ref, grads_ref = _oracle(x, w, b, mi, mo, bi, bo, gy, need_w=which == "weight_and_bias")
    leaves = [None if t is None else t.float().to(DEV) for t in (x, w, b, mi, mo)]
    want = {"x_only": [0], "masks_only": [3, 4], "out_only": [4], "weight_and_bias": [0, 1, 2, 3, 4]}[which]
    for i in want:
        if leaves[i] is not None:
            leaves[i].requires_grad_(True)
    y = K.masked_linear(*leaves, bi, bo)
    y.backward(gy.float().to(DEV))
    for i, (got, ref) in enumerate(zip(leaves, grads_ref)):
        if got is None:
            continue
        if i in want:
            _close(got.grad, ref, 2e-4, 1e-4)
        else:
            assert got.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_linear_half(ml_path, gen, dtype):
    bi, bo = 4, 8
    # fold rounds W * m_out to the half dtype once: with a non-binary m_out that is a systematic
    # weight perturbation (not per-token noise), so that path (only auto-chosen for fp32) is held
    # to the bound with 0/1 masks
    x, w, b, mi, mo, gy = _case(gen, (2, 13), 40, 24, bi, bo, "binary", "binary" if ml_path == "fold" else "real")
    mo[1] = 0.5  # no tiny value: the naive half reference underflows differently there
    y_ref, (dx_ref, _, _, dmi_ref, dmo_ref) = _oracle(x, w, b, mi, mo, bi, bo, gy)
    h = lambda t: t.to(dtype).detach().clone().requires_grad_(True)  # noqa: E731
    xn, min_, mon = h(x), h(mi), h(mo)
    yn = R.masked_linear(xn, w.to(dtype), b.to(dtype), min_, mon, bi, bo)
    yn.backward(gy.to(dtype))
    xk = x.to(dtype).to(DEV).requires_grad_(True)
    mik, mok = mi.float().to(DEV).requires_grad_(True), mo.float().to(DEV).requires_grad_(True)
    yk = K.masked_linear(xk, _dev(w.to(dtype)), _dev(b.to(dtype)), mik, mok, bi, bo)
    assert yk.dtype == dtype
    yk.backward(gy.to(dtype).to(DEV))
    # Condition-aware slack: rounding the operands of a sum to the half dtype perturbs each term by
    # ~eps relative, so a result much smaller than the sum of its |terms| (cancellation) carries an
    # absolute error ~eps * sum|terms| / sqrt(n) for ANY half-precision code; the naive code's own
    # error is a noisy yardstick there. Slack = eps/4 * max sum|terms| (typical << that << worst).
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    mie, moe = mi.repeat_interleave(bi), mo.repeat_interleave(bo)
    xm, gm = x.abs() * mie.abs(), gy.abs() * moe.abs()
    y_pre_abs = xm @ w.abs().t() + b.abs()
    scale = {
        "y": (y_pre_abs * moe.abs()).max(),
        "dx": ((gm @ w.abs()) * mie.abs()).max(),
        "dmask_in": ((gm @ w.abs()) * x.abs()).reshape(-1, mi.numel(), bi).sum((0, 2)).max(),
        "dmask_out": (gy.abs() * y_pre_abs).reshape(-1, mo.numel(), bo).sum((0, 2)).max(),
    }
    for name, got, naive, ref in [("y", yk, yn, y_ref), ("dx", xk.grad, xn.grad, dx_ref),
                                  ("dmask_in", mik.grad, min_.grad, dmi_ref), ("dmask_out", mok.grad, mon.grad, dmo_ref)]:
        err = (got.detach().double().cpu() - ref).abs().max().item()
        err_naive = (naive.double() - ref).abs().max().item()
        bound = 2 * err_naive + 1e-3 * ref.abs().max().item() + eps / 4 * float(scale[name])
        assert err <= bound, (name, err, err_naive, bound)


def test_zero_mask_gradients_exact_and_noncontiguous(ml_path, gen):
    """All-zero masks (every unit recomputed), and transposed x / weight (strided loads)."""
    bi, bo = 2, 4
    x, w, b, _, _, gy = _case(gen, (2, 9), 16, 12, bi, bo, None, None)
    mi = torch.zeros(16 // bi, dtype=torch.float64)
    mo = torch.zeros(12 // bo, dtype=torch.float64)
    y_ref, (dx_ref, _, _, dmi_ref, dmo_ref) = _oracle(x, w, b, mi, mo, bi, bo, gy)
    xt = x.float().to(DEV).transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    wt = w.float().to(DEV).t().contiguous().t()
    assert not wt.is_contiguous()
    mik, mok = mi.float().to(DEV).requires_grad_(True), mo.float().to(DEV).requires_grad_(True)
    y = K.masked_linear(xt, wt, _dev(b.float()), mik, mok, bi, bo)
    y.backward(gy.float().to(DEV))
    _close(y, y_ref, 1e-5)
    _close(xt.grad, dx_ref, 1e-5)
    _close(mik.grad, dmi_ref, 1e-4, 1e-4)
    _close(mok.grad, dmo_ref, 1e-4, 1e-4)


def test_nan_gradient_propagates(ml_path):
    arena = K.ScoreArena([("lin.in", 8, 1), ("lin.out", 3, 1)], device=DEV)
    x = torch.randn(2, 8, device=DEV, requires_grad=True)
    w = torch.randn(3, 8, device=DEV)
    y = K.masked_linear(x, w, None, arena.mask_view("lin.in"), arena.mask_view("lin.out"),
                        grad_acc_in=arena.grad_view("lin.in"), grad_acc_out=arena.grad_view("lin.out"))
    g = torch.ones_like(y)
    g[0, 0] = float("nan")
    y.backward(g)
    assert torch.isnan(arena.grad_view("lin.in")).any() and torch.isnan(arena.grad_view("lin.out")).any()


def test_torch_compile(ml_path, gen):
    lin = torch.nn.Linear(24, 16).to(DEV)
    mi = (torch.rand(6, generator=gen) > 0.3).float().to(DEV).requires_grad_(True)
    mo = torch.rand(16, generator=gen).to(DEV).requires_grad_(True)

    def f(x):
        return torch.relu(K.masked_linear(x, lin.weight, lin.bias, mi, mo, 4, 1)).sum()

    x = torch.randn(3, 5, 24, generator=gen).to(DEV)
    ref = f(x)
    ref.backward()
    g_ref = (mi.grad.clone(), mo.grad.clone())
    mi.grad = mo.grad = None
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    got.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close((mi.grad, mo.grad), g_ref)


# -- selection and the arena step ---------------------------------------------------------------

def _score_tensors(gen, sizes, dtype):
    out = []
    for s in sizes:
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        t[torch.rand(s, generator=gen) < 0.1] = 0.0
        if s > 3:
            t[1], t[2] = t[0], -t[0]  # ties
        out.append(t.to(dtype).to(DEV))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ignore_zeros", [True, False])
def test_kth_smallest(gen, dtype, ignore_zeros):
    ts = _score_tensors(gen, [123, 77, 5, 1, 300], dtype) + [torch.randn(4, 9, 5, generator=gen).to(dtype).to(DEV)]
    flat = torch.cat([t.reshape(-1).cpu() for t in ts]).to(torch.float64 if dtype == torch.float64 else torch.float32).abs()
    if ignore_zeros:
        flat = flat[flat != 0]
    for k in [1, 2, 3, flat.numel() // 2, flat.numel() - 1, flat.numel()]:
        got = K.global_kth_smallest(ts, k, ignore_zeros=ignore_zeros)
        assert got.device.type == DEV.type and got.dim() == 0
        assert float(got) == float(flat.kthvalue(k).values), k


def test_kth_errors():
    with pytest.raises(ValueError, match=r"k=4 out of range \[1, 3\]"):
        K.global_kth_smallest([torch.tensor([0.0, 1.0, 2.0, -3.0], device=DEV)], 4)
    with pytest.raises(ValueError, match="non-finite"):
        K.global_kth_smallest([torch.tensor([1.0, float("nan")], device=DEV)], 1)
    with pytest.raises(ValueError, match="non-finite"):
        K.global_kth_smallest([torch.ones(3, device=DEV), torch.tensor([float("inf")], device=DEV)], 1)


@pytest.mark.parametrize("n", [257, 5000])
@pytest.mark.parametrize("k", [0, 1, 7, 150, 10_000])
def test_prune_lowest(gen, n, k):
    """Ties at the threshold go to the lowest indices, also across program blocks (n = 5000)."""
    mask = (torch.rand(n, generator=gen) > 0.2).float()
    imp = torch.randn(n, generator=gen)
    imp[torch.rand(n, generator=gen) < 0.05] = 0.0
    imp[torch.rand(n, generator=gen) < 0.3] = 0.125  # many ties, spread over blocks
    imp[10:20] = -0.125
    m_ref, i_ref, n_ref = prune_oracle(mask, imp, k)
    md, idv = mask.to(DEV), imp.to(DEV)
    assert K.prune_lowest_(md, k, imp=idv) == n_ref
    assert torch.equal(md.cpu(), m_ref) and torch.equal(idv.cpu(), i_ref)


def test_arena_step_matches_torch_backend(gen, monkeypatch):
    specs = [(f"m{i}", u, b) for i, (u, b) in enumerate([(40, 1), (7, 4), (300, 1), (13, 2), (96, 1)])]
    arenas = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", name)
        a = K.ScoreArena(specs, device=DEV if name == "triton" else "cpu")
        g = torch.Generator().manual_seed(7)
        for step in range(3):
            a.acc.copy_(torch.randn(2, a.n_units, generator=g).abs().to(a.device) * torch.tensor([[1.0], [0.1]]).to(a.device))
            a.acc[0, :5] = 0.0  # zero scores are pruned
            res = a.step("taylor2", ema=0.4, ratio=0.15)
        arenas[name] = (a, res)
    (ta, tr), (ga, gr) = arenas["torch"], arenas["triton"]
    assert tr == gr
    assert torch.equal(ta.mask, ga.mask.cpu())
    torch.testing.assert_close(ta.imp, ga.imp.cpu())


# -- statistics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["sum", "mean", "l2", "max"])
@pytest.mark.parametrize("block", [1, 3, 16, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_block_reduce(gen, op, block, dtype):
    s = torch.randn(3, 5, 4 * block, generator=gen, dtype=torch.float64)
    got = K.block_reduce(s.to(dtype).to(DEV), block, op)
    assert got.dtype == dtype and got.shape == (3, 5, 4)
    v = s.to(dtype).double().view(3, 5, 4, block)
    want = {"sum": v.sum(-1), "mean": v.mean(-1), "l2": v.pow(2).sum(-1).sqrt(), "max": v.amax(-1)}[op]
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double().cpu(), want, atol=tol * max(1, block**0.5), rtol=tol)


@pytest.mark.parametrize("dtype,acc_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float64), (torch.float64, torch.float64)])
def test_act_sq(gen, dtype, acc_dtype):
    x = torch.randn(3, 700, 37, generator=gen).to(dtype)
    acc = torch.full((37,), 2.0, dtype=acc_dtype, device=DEV)
    K.act_sq_accumulate_(x.to(DEV), acc)
    K.act_sq_accumulate_(x.to(DEV).transpose(0, 1), acc)  # a non-contiguous input: strided rows
    want = 2.0 + 2 * x.double().reshape(-1, 37).pow(2).sum(0)
    torch.testing.assert_close(acc.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_ema(gen):
    imp = torch.randn(3000, generator=gen)
    s = torch.randn(3000, generator=gen)
    want = 0.3 * s + 0.7 * imp
    got = imp.to(DEV)
    out = K.ema_update_(got, s.to(DEV), 0.3)
    assert out.data_ptr() == got.data_ptr()
    torch.testing.assert_close(got.cpu(), want)


# -- dispatch -------------------------------------------------------------------------------------

def test_backend_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.choose("masked_linear", "cpu")
    # ops without a Triton implementation keep their automatic choice
    assert _backend.choose("scores", "cpu").backend == "torch"
    if torch.cuda.is_available():
        assert _backend.choose("masked_linear", "cuda").backend == "triton"
        monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", "auto")
        assert _backend.choose("prune_lowest_", "cuda").backend == "triton"


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="the CUDA repack kernel needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.bool, torch.complex128])
def test_cuda_repack(gen, dtype):
    if not _backend.cuda_ext_available():
        if os.environ.get("TSPRUNE_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"TSPRUNE_REQUIRE_CUDA_EXT=1 but tsprune_kernels._C_cuda did not load: {_backend._C_CUDA_ERROR}")
        pytest.skip(f"CUDA extension not built: {_backend._C_CUDA_ERROR}")
    shapes = [(77, 123), (5,), (6, 10, 3), (1, 1), (64, 64), (3000, 17), (8, 5000)]
    ts = []
    for s in shapes:
        t = torch.randn(s, generator=gen) * 50
        ts.append((t > 0) if dtype == torch.bool else t.to(dtype))
    ts = [t.to("cuda") for t in ts]
    ts[4] = ts[4].t()  # non-contiguous source
    rows, cols = [], []
    for i, t in enumerate(ts):
        n0 = t.shape[0]
        if i == 3:
            rows.append(None)
        elif i == 5:  # kept runs (pruned heads): vector path
            rows.append(torch.cat([torch.arange(j, min(j + 64, n0)) for j in range(0, n0, 128)]).cuda())
        else:
            rows.append(torch.randperm(n0, generator=gen)[: max(1, n0 // 2)].sort().values.cuda())
        if t.dim() == 1 or i == 4:
            cols.append(None)
        elif i == 6:
            cols.append(torch.cat([torch.arange(j, j + 64) for j in range(0, 5000 - 64, 128)]).cuda())
        else:
            cols.append(torch.tensor([4, 0, 0, t.shape[1] - 1]).cuda() if i == 0 else
                        torch.randperm(t.shape[1], generator=gen)[: max(1, t.shape[1] // 3)].sort().values.cuda())
    out = K.repack(ts, rows, cols)
    for t, r, c, o in zip(ts, rows, cols, out):
        want = t if r is None else t.index_select(0, r)
        want = want if c is None else want.index_select(1, c)
        assert o.dtype == t.dtype and o.is_contiguous() and o.data_ptr() != t.data_ptr()
        assert torch.equal(o, want)
