"""The ``tsprune::`` torch ops: every public kernel defined once, with its fake and its kernels.

Stage of the flow: between the public wrappers (``ops/*.py``: validation, autograd) and the
implementations (``torch_impl.py``, the C++ extension, ``triton/``). The wrappers call
``torch.ops.tsprune.<op>``; the dispatcher picks the kernel from the tensors' device, so the ops
are visible to torch.compile / FakeTensor / opcheck like any ATen op.

Where each kernel comes from (docs/KERNELS.md, "Ops and dispatch"):

    schema, fake          here (SCHEMAS, _FAKES), once
    CompositeExplicitAutograd   the torch backend (torch_impl.py): every device without a kernel
                          of its own (CPU without the extension, CUDA without Triton, MPS, ...)
    CPU                   the C++ extension, registered from C++ (csrc/cpu/op_kernels.cpp,
                          TORCH_LIBRARY_IMPL) when ``tsprune_kernels._C`` loads
    CUDA                  a Python kernel that resolves, once per op, to Triton or the CUDA
                          extension (repack) or the torch backend (``_backend.choose``)
    CompositeImplicitAutograd   the five score formulas (torch only, differentiable, traced
                          through by torch.compile; their fake is their decomposition)

A forced backend (``TSPRUNE_KERNELS_BACKEND``, read once; ``set_backend``) adds a second library
of override kernels on the CPU and CUDA keys that call exactly that backend (raising where it is
unavailable); ``apply_forced_backend`` replaces or removes it, which restores the kernels above.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import _backend
from . import torch_impl as T

LIB = torch.library.Library("tsprune", "DEF")  # noqa: TOR901  (owns the namespace's definitions)

# op -> schema. Sizes are SymInt so a dynamic-shape trace keeps them symbolic.
SCHEMAS = {
    # x [T, K] -> (y [T, N], y_pre_zero [T, Z]); see ops/masked_linear.py
    "masked_linear_fwd": "(Tensor x, Tensor weight, Tensor? bias, Tensor? mask_in, Tensor? mask_out, "
                         "SymInt block_in, SymInt block_out, bool keep_zero_pre) -> (Tensor, Tensor)",
    # -> (dx, dweight, dbias, dmask_in, dmask_out), empty where output_mask (in that order, ATen's
    # convention) is false; accumulators += in place (a mask with one gets it even when false)
    "masked_linear_bwd": "(Tensor gy, Tensor x, Tensor y, Tensor weight, Tensor? bias, Tensor? mask_in, "
                         "Tensor? mask_out, SymInt block_in, SymInt block_out, SymInt tokens_per_sample, "
                         "bool[5] output_mask, Tensor(a!)? acc_in, Tensor(b!)? acc_out, Tensor(c!)? sq_in, "
                         "Tensor(d!)? sq_out, Tensor? y_pre_zero) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "global_kth_smallest": "(Tensor[] tensors, SymInt k, bool ignore_zeros) -> Tensor",
    # returns the number pruned as a 0-d int64 tensor (the wrapper turns it into an int)
    "prune_lowest_": "(Tensor(a!) mask, Tensor(b!) imp, SymInt k) -> Tensor",
    "repack": "(Tensor[] tensors, Tensor?[] keep_rows, Tensor?[] keep_cols) -> Tensor[]",
    "act_sq_accumulate_": "(Tensor x, Tensor(a!) acc) -> ()",
    "block_reduce": "(Tensor scores, SymInt block, str op) -> Tensor",
    "ema_update_": "(Tensor(a!) imp, Tensor score, float ema) -> ()",
    "taylor_score": "(Tensor grad, Tensor mask) -> Tensor",
    "taylor2_score": "(Tensor grad, Tensor sq) -> Tensor",
    "fisher_score": "(Tensor sq) -> Tensor",
    "magnitude_score": "(Tensor weight, SymInt dim, SymInt block) -> Tensor",
    "wanda_score": "(Tensor act_sq, Tensor weight, SymInt block) -> Tensor",
}

# op -> the row of _backend's decision table it follows (backends() reports these rows)
GROUP = {
    "masked_linear_fwd": "masked_linear",
    "masked_linear_bwd": "masked_linear",
    "global_kth_smallest": "global_kth_smallest",
    "prune_lowest_": "prune_lowest_",
    "repack": "repack",
    "act_sq_accumulate_": "act_sq_accumulate_",
    "block_reduce": "block_reduce",
    "ema_update_": "ema_update_",
}
SCORE_OPS = ("taylor_score", "taylor2_score", "fisher_score", "magnitude_score", "wanda_score")


def _empty_dims(x: Tensor, weight: Tensor) -> bool:
    """No tokens, K = 0 or N = 0: every backend takes the formulas (F.linear semantics)."""
    return x.shape[0] == 0 or x.shape[1] == 0 or weight.shape[0] == 0


def _no_pre(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], 0))


def _tensors(outs, x: Tensor) -> tuple[Tensor, ...]:
    """Backward results: an empty tensor for each gradient not asked for (ops return no None)."""
    return tuple(x.new_empty(0) if o is None else o for o in outs)


# -- the torch backend (CompositeExplicitAutograd) -------------------------------------------------

def _note(x: Tensor) -> None:
    if x.device.type == "cpu" and _backend._C is None:
        _backend._note_missing_extension()  # a CPU op that has a C++ kernel ran without it


def _torch_ml_fwd(x, weight, bias, mask_in, mask_out, block_in, block_out, keep_zero_pre):
    _note(x)
    return T.masked_linear_fwd(x, weight, bias, mask_in, mask_out, block_in, block_out), _no_pre(x)


def _torch_ml_bwd(*args):
    x, weight = args[1], args[3]
    _note(x)
    fn = T.masked_linear_bwd_direct if _empty_dims(x, weight) else T.masked_linear_bwd
    return _tensors(fn(*args[:15]), x)


def _torch_kth(tensors, k, ignore_zeros):
    _note(tensors[0])
    return T.kth_smallest_abs(list(tensors), k, ignore_zeros)


def _torch_prune(mask, imp, k):
    _note(mask)
    return torch.tensor(T.prune_lowest_(mask, imp, k), dtype=torch.long, device=mask.device)


def _torch_repack(tensors, keep_rows, keep_cols):
    if tensors:
        _note(tensors[0])
    out = T.repack(list(tensors), list(keep_rows), list(keep_cols))
    return [o.clone() if o is t else o for o, t in zip(out, tensors)]  # never the input itself


def _torch_act_sq(x, acc):
    _note(x)
    T.act_sq_accumulate_(x, acc)


def _torch_ema(imp, score, ema):
    T.ema_update_(imp, score, ema)


_TORCH = {
    "masked_linear_fwd": _torch_ml_fwd,
    "masked_linear_bwd": _torch_ml_bwd,
    "global_kth_smallest": _torch_kth,
    "prune_lowest_": _torch_prune,
    "repack": _torch_repack,
    "act_sq_accumulate_": _torch_act_sq,
    "block_reduce": T.block_reduce,
    "ema_update_": _torch_ema,
}


# -- the C++ extension, called through its Python binding (TSPRUNE_KERNELS_BACKEND=cpp) -------------
# Auto mode never comes here: the dispatcher calls the C++ kernels directly. Forced, the same C++
# functions are called through tsprune_kernels._C (looked up at each call, so a test can wrap one).

def _cpp_ml_fwd(x, weight, bias, mask_in, mask_out, block_in, block_out, keep_zero_pre):
    args = (x, weight, bias, mask_in, mask_out, block_in, block_out)
    if keep_zero_pre and mask_out is not None:
        y, ypz = _backend._C.masked_linear_fwd_keep(*args)
        return y, ypz
    return _backend._C.masked_linear_fwd(*args), _no_pre(x)


def _cpp_prune(mask, imp, k):
    return torch.tensor(_backend._C.prune_lowest_(mask, imp, k), dtype=torch.long)


def _cpp_act_sq(x, acc):
    _backend._C.act_sq_accumulate_(x, acc)


_CPP = {
    "masked_linear_fwd": _cpp_ml_fwd,
    "masked_linear_bwd": lambda *a: _tensors(_backend._C.masked_linear_bwd(*a), a[1]),
    "global_kth_smallest": lambda ts, k, iz: _backend._C.kth_smallest_abs(list(ts), k, iz),
    "prune_lowest_": _cpp_prune,
    "repack": lambda ts, r, c: list(_backend._C.repack(list(ts), list(r), list(c))),
    "act_sq_accumulate_": _cpp_act_sq,
}


# -- Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1) ---------------------------------------

def _tk():
    return _backend.triton_impl()


def _triton_ml_fwd(x, weight, bias, mask_in, mask_out, block_in, block_out, keep_zero_pre):
    if _empty_dims(x, weight):
        return _torch_ml_fwd(x, weight, bias, mask_in, mask_out, block_in, block_out, keep_zero_pre)
    return _tk().masked_linear_fwd(x, weight, bias, mask_in, mask_out, block_in, block_out), _no_pre(x)


def _triton_ml_bwd(*args):
    if _empty_dims(args[1], args[3]):
        return _torch_ml_bwd(*args)
    return _tensors(_tk().masked_linear_bwd(*args[:15]), args[1])


def _triton_prune(mask, imp, k):
    return torch.tensor(_tk().prune_lowest_(mask, imp, k), dtype=torch.long, device=mask.device)


def _triton_act_sq(x, acc):
    _tk().act_sq_accumulate_(x, acc)


def _triton_ema(imp, score, ema):
    _tk().ema_update_(imp, score, ema)


_TRITON = {
    "masked_linear_fwd": _triton_ml_fwd,
    "masked_linear_bwd": _triton_ml_bwd,
    "global_kth_smallest": lambda ts, k, iz: _tk().kth_smallest_abs(list(ts), k, iz),
    "prune_lowest_": _triton_prune,
    "act_sq_accumulate_": _triton_act_sq,
    "block_reduce": lambda s, block, op: _tk().block_reduce(s, block, op),
    "ema_update_": _triton_ema,
}


# -- the CUDA extension (repack) ----------------------------------------------------------------------

def _cuda_repack(tensors, keep_rows, keep_cols):
    dev = tensors[0].device if tensors else None
    if dev is None or dev.type != "cuda" or any(t.device != dev for t in tensors):
        return _torch_repack(tensors, keep_rows, keep_cols)
    with torch.cuda.device(dev):  # one launch for all tensors, on the current stream
        return list(_backend._C_CUDA.repack(list(tensors), list(keep_rows), list(keep_cols),
                                            torch.cuda.current_stream(dev).cuda_stream))


IMPLS = {"torch": _TORCH, "cpp": _CPP, "triton": _TRITON, "cuda": {"repack": _cuda_repack}}


# -- fakes (shapes and dtypes only; FakeTensor / meta / torch.compile) ---------------------------------

def _fake_ml_fwd(x, weight, bias, mask_in, mask_out, block_in, block_out, keep_zero_pre):
    # y_pre_zero's width depends on the mask values (and the backend): a data-dependent size,
    # unless nothing is kept (what masked_linear asks for while being compiled).
    z = torch.library.get_ctx().new_dynamic_size() if keep_zero_pre else 0
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], z))


def _fake_ml_bwd(gy, x, y, weight, bias, mask_in, mask_out, block_in, block_out, tokens_per_sample,
                 output_mask, *_accs_and_pre):
    need_x, need_weight, need_bias, need_mask_in, need_mask_out = output_mask
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (  # one fresh empty tensor per gradient not asked for (outputs never alias)
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(weight) if need_weight else x.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_bias else x.new_empty(0),
        x.new_empty(mask_in.shape[0], dtype=acc_t) if need_mask_in else x.new_empty(0),
        x.new_empty(mask_out.shape[0], dtype=acc_t) if need_mask_out else x.new_empty(0),
    )


def _fake_kth(tensors, k, ignore_zeros):
    return tensors[0].new_empty((), dtype=torch.float64 if tensors[0].dtype == torch.float64 else torch.float32)


def _fake_repack(tensors, keep_rows, keep_cols):
    out = []
    for t, r, c in zip(tensors, keep_rows, keep_cols):
        shape = list(t.shape)
        if r is not None:
            shape[0] = r.shape[0]
        if c is not None:
            shape[1] = c.shape[0]
        out.append(t.new_empty(shape))
    return out


_FAKES = {
    "masked_linear_fwd": _fake_ml_fwd,
    "masked_linear_bwd": _fake_ml_bwd,
    "global_kth_smallest": _fake_kth,
    "prune_lowest_": lambda mask, imp, k: mask.new_empty((), dtype=torch.long),
    "repack": _fake_repack,
    "act_sq_accumulate_": lambda x, acc: None,
    "block_reduce": lambda s, block, op: s.new_empty((*s.shape[:-1], s.shape[-1] // block)),
    "ema_update_": lambda imp, score, ema: None,
}


# -- dispatch: the CUDA kernels (auto) and the forced-backend overrides -----------------------------------

_resolved: dict[tuple[str, str], object] = {}  # (op, device type) -> implementation; set_backend clears


def _routed(op: str, dev: str):
    """A kernel for ``dev`` tensors that runs the backend ``_backend.choose`` picks for ``op``,
    decided at the first call and kept (a refusal, e.g. a forced backend that is missing, is
    raised at every call instead)."""
    group = GROUP[op]

    def kernel(*args):
        fn = _resolved.get((op, dev))
        if fn is None:
            first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
            backend = _backend.choose(group, first.device).backend
            fn = _resolved[(op, dev)] = IMPLS[backend].get(op, _TORCH[op])
        return fn(*args)

    kernel.__name__ = f"tsprune_{op}_{dev}"
    return kernel


def _define() -> None:
    for op, schema in SCHEMAS.items():
        LIB.define(op + schema)
    for op in GROUP:
        torch.library.register_kernel(f"tsprune::{op}", None, _TORCH[op], lib=LIB)
        torch.library.register_fake(f"tsprune::{op}", _FAKES[op], lib=LIB)
        torch.library.register_kernel(f"tsprune::{op}", "cuda", _routed(op, "cuda"), lib=LIB)
    for op in SCORE_OPS:
        LIB.impl(op, getattr(T, op), "CompositeImplicitAutograd")


_define()

_override: torch.library.Library | None = None


def apply_forced_backend() -> None:
    """Install (or remove, for ``auto``) the override kernels of the forced backend. Called once at
    import and by ``_backend.set_backend``."""
    global _override
    _resolved.clear()
    if _override is not None:
        _override._destroy()  # the kernels above (C++ on CPU, the auto CUDA kernel) are back
        _override = None
    if _backend._FORCED == "auto":
        return
    _override = torch.library.Library("tsprune", "IMPL")  # noqa: TOR901
    with warnings.catch_warnings():  # "overriding a previously registered kernel": intended
        warnings.simplefilter("ignore")
        for op in GROUP:
            for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")):
                _override.impl(op, _routed(op, dev), key)


apply_forced_backend()
