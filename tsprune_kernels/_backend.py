"""Which implementation runs each op, and why: the decision table behind the op registrations.

Every public kernel is a ``torch.library`` op in the ``tsprune`` namespace (``_library.py``), so
the dispatcher, not an if-ladder, picks the implementation by the tensors' device:

    CPU    the C++ kernel of the compiled extension ``tsprune_kernels._C`` (registered from C++,
           csrc/cpu/op_kernels.cpp), for masked_linear, global_kth_smallest, prune_lowest_,
           repack and act_sq_accumulate_
    CUDA   ``triton`` (``tsprune_kernels/triton/``: masked_linear, selection, block_reduce,
           act_sq, EMA) or ``cuda`` (``tsprune_kernels._C_cuda``: repack), chosen once per op at
           its first CUDA call
    other  ``torch`` (``torch_impl.py``), the fallback kernel of every op on every device

``TSPRUNE_KERNELS_BACKEND`` (``auto`` | ``torch`` | ``cpp`` | ``triton`` | ``cuda``) is read ONCE, when
this module is imported; ``set_backend(name)`` changes it at run time (tests, benchmarks). A forced
backend installs override kernels on the CPU and CUDA dispatch keys that call that backend for
every op that has it; forcing one that is not available raises at the first call of an affected op
(and ``backends()`` shows the reason). ``triton`` / ``cuda`` forced on an op that has no such
implementation leaves that op on its automatic choice. ``triton`` forced also applies to CPU
tensors, which only works under the Triton interpreter (``TRITON_INTERPRET=1``, small shapes:
tests); otherwise it raises. The compiled extensions and Triton are loaded inside guards: when one
is missing the package keeps working on the torch implementation and says so once.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

VALID = ("auto", "torch", "cpp", "triton", "cuda")

_C = None
_C_ERROR: str | None = None
try:  # the guarded load: the pure-Python path must keep working without the .so
    import importlib

    _C = importlib.import_module(f"{__package__}._C")
except Exception as e:  # ImportError, or an ABI mismatch surfacing as OSError / RuntimeError
    _C = None
    _C_ERROR = f"{type(e).__name__}: {e}"

_C_CUDA = None
_C_CUDA_ERROR: str | None = None
try:  # the CUDA extension (repack); a separate .so so that CPU-only builds never need it
    _C_CUDA = importlib.import_module(f"{__package__}._C_cuda")
except Exception as e:
    _C_CUDA = None
    _C_CUDA_ERROR = f"{type(e).__name__}: {e}"

_TRITON = None  # the tsprune_kernels.triton module once imported, False when it cannot be
_TRITON_ERROR: str | None = None

_warned = False


def _parse(value: str | None) -> str:
    return (value or "auto").strip().lower() or "auto"


# The forced backend: read from the environment once, here; set_backend() changes it.
_FORCED: str = _parse(os.environ.get("TSPRUNE_KERNELS_BACKEND"))


def requested() -> str:
    """The forced backend (``auto`` when none); ValueError for a value that is not one of VALID
    (raised at the first op call, not at import)."""
    if _FORCED not in VALID:
        raise ValueError(f"TSPRUNE_KERNELS_BACKEND={_FORCED!r} is not one of {', '.join(VALID)}")
    return _FORCED


def set_backend(name: str | None) -> str:
    """Force ``name`` (one of VALID; None = ``auto``) for every op from now on, replacing what
    ``TSPRUNE_KERNELS_BACKEND`` said at import. Returns the previous value. Changing the
    environment variable after import has no effect: call this instead."""
    global _FORCED
    value = _parse(name)
    if value not in VALID:
        raise ValueError(f"set_backend: {value!r} is not one of {', '.join(VALID)}")
    previous, _FORCED = _FORCED, value
    from . import _library  # the registrations follow the new value

    _library.apply_forced_backend()
    return previous


def cpp_available() -> bool:
    return _C is not None


def cuda_ext_available() -> bool:
    return _C_CUDA is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_impl():
    """The ``tsprune_kernels.triton`` module (imported on first use, so that TRITON_INTERPRET set
    by the caller before the first call is honoured); None when Triton cannot be imported."""
    global _TRITON, _TRITON_ERROR
    if _TRITON is None:
        try:
            _TRITON = importlib.import_module(f"{__package__}.triton")
        except Exception as e:  # no triton, or one too old for the kernels
            _TRITON = False
            _TRITON_ERROR = f"{type(e).__name__}: {e}"
    return _TRITON or None


def triton_available() -> bool:
    return triton_impl() is not None


def _note_missing_extension() -> None:
    global _warned
    if not _warned and _C is None:
        _warned = True
        warnings.warn(
            "tsprune_kernels: compiled CPU extension not loaded "
            f"({_C_ERROR}); using the pure-torch implementation (slower). "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend} ({self.reason})"


# Ops that have a C++ CPU implementation.
CPP_OPS = ("masked_linear", "global_kth_smallest", "prune_lowest_", "repack", "act_sq_accumulate_")
# Ops with a Triton implementation (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
TRITON_OPS = ("masked_linear", "global_kth_smallest", "prune_lowest_", "act_sq_accumulate_",
              "block_reduce", "ema_update_")
# Ops with a CUDA C++ implementation (tsprune_kernels._C_cuda).
CUDA_OPS = ("repack",)
ALL_OPS = CPP_OPS + ("block_reduce", "ema_update_", "scores")


def _forced_triton(op: str, dev: str) -> Choice:
    if dev not in ("cpu", "cuda"):
        raise RuntimeError(f"TSPRUNE_KERNELS_BACKEND=triton but op {op!r} got {dev} tensors (cuda or cpu only)")
    if not triton_available():
        raise RuntimeError(f"TSPRUNE_KERNELS_BACKEND=triton but Triton is not usable: {_TRITON_ERROR}")
    if dev == "cpu" and not triton_interpreting():
        raise RuntimeError(
            f"TSPRUNE_KERNELS_BACKEND=triton with CPU tensors (op {op!r}) needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before the first call (tests / small shapes only), or move the "
            "tensors to a CUDA device"
        )
    return Choice("triton", "forced by TSPRUNE_KERNELS_BACKEND=triton"
                  + (" (Triton interpreter)" if dev == "cpu" else ""))


def choose(op: str, device: torch.device | str) -> Choice:
    """Backend for ``op`` on ``device``; raises RuntimeError when a forced backend is unavailable."""
    dev = torch.device(device).type
    want = requested()
    has_cpp = dev == "cpu" and op in CPP_OPS
    if want == "torch":
        return Choice("torch", "forced by TSPRUNE_KERNELS_BACKEND=torch")
    if want == "cpp":
        if not has_cpp:
            raise RuntimeError(
                f"TSPRUNE_KERNELS_BACKEND=cpp but op {op!r} has no C++ implementation for {dev} tensors"
            )
        if _C is None:
            raise RuntimeError(f"TSPRUNE_KERNELS_BACKEND=cpp but the extension did not load: {_C_ERROR}")
        return Choice("cpp", "forced by TSPRUNE_KERNELS_BACKEND=cpp")
    if want == "triton" and op in TRITON_OPS:
        return _forced_triton(op, dev)
    if want == "cuda" and op in CUDA_OPS:
        if dev != "cuda":
            raise RuntimeError(f"TSPRUNE_KERNELS_BACKEND=cuda but op {op!r} got {dev} tensors")
        if _C_CUDA is None:
            raise RuntimeError(f"TSPRUNE_KERNELS_BACKEND=cuda but tsprune_kernels._C_cuda did not load: {_C_CUDA_ERROR}")
        return Choice("cuda", "forced by TSPRUNE_KERNELS_BACKEND=cuda")
    # auto (or triton / cuda forced on an op without such an implementation)
    if dev == "cuda":
        if op in CUDA_OPS and _C_CUDA is not None:
            return Choice("cuda", "compiled extension tsprune_kernels._C_cuda loaded")
        if op in TRITON_OPS and torch.cuda.is_available() and triton_available():
            return Choice("triton", f"Triton {_triton_version()} kernels")
        if op in CUDA_OPS:
            return Choice("torch", f"CUDA extension not loaded: {_C_CUDA_ERROR}")
        if op in TRITON_OPS:
            why = _TRITON_ERROR if not triton_available() else "no CUDA device"
            return Choice("torch", f"Triton not usable: {why}")
        return Choice("torch", "implemented as a few fused torch ops on every device")
    if has_cpp:
        if _C is not None:
            return Choice("cpp", "compiled extension tsprune_kernels._C loaded")
        _note_missing_extension()
        return Choice("torch", f"extension not loaded: {_C_ERROR}")
    if op in CPP_OPS:
        return Choice("torch", f"no {dev} kernel in this build")
    return Choice("torch", "implemented as a few fused torch ops on every device")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # pragma: no cover
        return "?"


def backends() -> dict[str, dict[str, str]]:
    """Which implementation each op uses right now, per device type, with the reason."""
    out: dict[str, dict[str, str]] = {}
    for op in ALL_OPS:
        row = {}
        for dev in ("cpu", "cuda"):
            try:
                row[dev] = str(choose(op, dev))
            except RuntimeError as e:
                row[dev] = f"unavailable: {e}"
        out[op] = row
    return out
