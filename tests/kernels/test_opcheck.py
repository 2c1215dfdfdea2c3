"""Every tsprune:: op passes torch.library.opcheck (schema and mutation annotations, fake
implementation vs the real kernel, autograd registration, AOT dispatch with static and dynamic
shapes), on each CPU backend: ``cpp`` (the C++ kernels the dispatcher calls, registered from C++)
and ``torch`` (the fallback kernels). Also: the op table is complete, auto mode runs the C++ kernels
natively (not through Python), and set_backend switches and restores the registrations."""
from __future__ import annotations

import pytest
import torch

import tsprune_kernels as K
from tsprune_kernels import _backend, _library

ops = torch.ops.tsprune


def _cases(gen):
    """(op name, args) for every op, small odd shapes, mutated buffers fresh per case."""
    x = torch.randn(12, 8, generator=gen)
    w = torch.randn(6, 8, generator=gen)
    b = torch.randn(6, generator=gen)
    mi = torch.tensor([1.0, 0.0, 0.5, 1.0])
    mo = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 1.0])
    y, ypz = ops.masked_linear_fwd(x, w, b, mi, mo, 2, 1, True)
    gy = torch.randn(12, 6, generator=gen)
    scores = [torch.randn(s, generator=gen) for s in (7, (3, 5), 1)]
    mask = (torch.rand(30, generator=gen) > 0.3).float()
    imp = torch.randn(30, generator=gen)
    imp[3] = 0.0
    flat = torch.randn(20, generator=gen)
    yield "masked_linear_fwd", (x, w, b, mi, mo, 2, 1, True)
    yield "masked_linear_fwd", (x, w, None, None, mo[:3], 1, 2, False)
    yield "masked_linear_fwd", (torch.randn(0, 8), w, b, mi, mo, 2, 1, True)  # no tokens
    yield "masked_linear_bwd", (gy, x, y, w, b, mi, mo, 2, 1, 3, [True] * 5,
                                None, None, None, None, ypz)
    yield "masked_linear_bwd", (gy, x, y, w, b, mi, mo, 2, 1, 4, [True, False, False, False, False],
                                torch.zeros(4), torch.zeros(6, dtype=torch.float64), torch.zeros(4),
                                torch.zeros(6), None)
    yield "global_kth_smallest", (scores, 5, True)
    yield "global_kth_smallest", ([s.double() for s in scores], 1, False)
    yield "prune_lowest_", (mask.clone(), imp.clone(), 4)
    yield "prune_lowest_", (mask.clone().double(), imp.clone().double(), 4)  # the generic path
    yield "repack", ([w, b, torch.randn(5, 4, 3, generator=gen)],
                     [torch.tensor([4, 0, 2]), None, torch.tensor([1, 1])],
                     [torch.tensor([7, 1]), None, None])
    yield "act_sq_accumulate_", (torch.randn(2, 5, 8, generator=gen), torch.ones(8))
    yield "act_sq_accumulate_", (x, torch.ones(8, dtype=torch.float64))
    yield "block_reduce", (torch.randn(3, 12, generator=gen), 4, "l2")
    yield "ema_update_", (imp.clone(), flat[:30].repeat(2)[:30], 0.3)
    yield "taylor_score", (flat, flat.abs())
    yield "taylor2_score", (flat, flat.square())
    yield "fisher_score", (flat.square(),)
    yield "magnitude_score", (w, 1, 2)
    yield "wanda_score", (torch.rand(8, generator=gen), w, 4)


def test_every_op_is_registered():
    assert set(_library.SCHEMAS) == set(_library.GROUP) | set(_library.SCORE_OPS)
    for name, schema in _library.SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == f"tsprune::{name}{schema}"
    # the kernels the dispatcher has for each op
    for name in _library.GROUP:
        op = f"tsprune::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta")  # the fake
    for name in _library.SCORE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tsprune::{name}", "CompositeImplicitAutograd")


@pytest.mark.parametrize("case", range(19))
@pytest.mark.parametrize("mode", ["auto", "torch", "cpp"])
def test_opcheck(gen, monkeypatch, mode, case):
    """auto: the C++ kernels registered from C++ (CPU, when built); torch: the fallback kernels;
    cpp: the forced backend's override kernels (through the pybind11 binding)."""
    name, args = list(_cases(gen))[case]
    if mode == "cpp":
        if not _backend.cpp_available():
            pytest.skip(f"C++ extension not built: {_backend._C_ERROR}")
        if _library.GROUP.get(name) not in _backend.CPP_OPS:
            pytest.skip(f"{name} has no C++ kernel (forced cpp refuses it: test_forced_cpp_refuses...)")
    monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", mode)
    torch.library.opcheck(getattr(ops, name).default, args)


def test_case_count_matches(gen):
    assert len(list(_cases(gen))) == 19


def test_auto_cpu_runs_the_cpp_kernels_registered_from_cpp(gen):
    """Auto mode with the extension: the CPU kernels are the C++ ones registered by
    TORCH_LIBRARY_IMPL (no Python frame): a wrapper around the Python binding is never called."""
    if not _backend.cpp_available():
        pytest.skip(f"C++ extension not built: {_backend._C_ERROR}")
    assert _backend.requested() == "auto"
    for name in ("masked_linear_fwd", "masked_linear_bwd", "global_kth_smallest", "prune_lowest_",
                 "repack", "act_sq_accumulate_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tsprune::{name}", "CPU"), name
    table = torch._C._dispatch_dump_table("tsprune::prune_lowest_")
    assert "CPU: registered at" in table and "op_kernels.cpp" in table, table


def test_set_backend_switches_and_restores(gen, monkeypatch):
    """set_backend("torch") routes CPU calls to the torch kernels; back to auto the C++ ones run
    again; the environment variable is read once (changing it later does nothing by itself)."""
    calls = []
    real = _library._TORCH["prune_lowest_"]
    monkeypatch.setitem(_library._TORCH, "prune_lowest_", lambda *a: calls.append(1) or real(*a))
    previous = K.set_backend("torch")
    try:
        assert K.backends()["prune_lowest_"]["cpu"].startswith("torch (forced")
        m, i = torch.ones(10), torch.arange(10.0)
        assert K.prune_lowest_(m, 3, imp=i) == 4  # 0 and the three smallest nonzero
        assert calls == [1]
    finally:
        K.set_backend(previous)
    assert _backend.requested() == previous
    calls.clear()
    K.prune_lowest_(torch.ones(10), 3, imp=torch.arange(10.0))
    assert calls == []  # auto: the C++ kernel (or, without it, the registered torch kernel)
    # the variable is read once: setting it now (without the tests' monkeypatch bridge) does nothing
    monkeypatch.setitem(__import__("os").environ, "TSPRUNE_KERNELS_BACKEND", "torch")
    assert _backend.requested() == previous
    with pytest.raises(ValueError, match="not one of"):
        K.set_backend("fortran")


def test_forced_cpp_refuses_ops_without_cpp(monkeypatch):
    if not _backend.cpp_available():
        pytest.skip(f"C++ extension not built: {_backend._C_ERROR}")
    monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="no C\\+\\+ implementation"):
        K.ema_update_(torch.zeros(3), torch.ones(3), 0.5)
    assert float(K.taylor_score(torch.ones(2), torch.ones(2)).sum()) == -2.0  # scores: torch only


def test_fakes_give_shapes_without_data(gen):
    """The ops run on meta tensors through their fakes (what torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):  # y_pre_zero's width is a data-dependent size
        x = torch.empty(10, 8)
        w = torch.empty(6, 8)
        y, ypz = ops.masked_linear_fwd(x, w, None, torch.ones(4), torch.ones(3), 2, 2, True)
        assert y.shape == (10, 6) and ypz.shape[0] == 10
        out = ops.repack([w], [torch.zeros(4, dtype=torch.long)], [None])
        assert out[0].shape == (4, 8)
        assert ops.global_kth_smallest([x, w], 3, True).dtype == torch.float32
        assert ops.block_reduce(torch.empty(2, 12), 3, "max").shape == (2, 4)
