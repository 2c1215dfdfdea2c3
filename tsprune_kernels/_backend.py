"""Which implementation runs each op, and why.

Order of preference per device: CPU -> ``cpp`` (the compiled extension ``tsprune_kernels._C``) then
``torch``; CUDA -> ``triton`` / ``cuda`` when they exist, then ``torch``. ``TSPRUNE_KERNELS_BACKEND``
(``auto`` | ``torch`` | ``cpp`` | ``triton`` | ``cuda``) forces one backend for every op that has it;
forcing one that is not available raises at the first call of an affected op (and ``backends()``
shows the reason). The compiled extension is loaded inside a guard: when it is missing the package
keeps working on the torch implementation and says so once.
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

_warned = False


def requested() -> str:
    v = os.environ.get("TSPRUNE_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if v not in VALID:
        raise ValueError(f"TSPRUNE_KERNELS_BACKEND={v!r} is not one of {', '.join(VALID)}")
    return v


def cpp_available() -> bool:
    return _C is not None


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


# Ops that have a C++ CPU implementation. The Triton / CUDA implementations come with the GPU issue.
CPP_OPS = ("masked_linear", "global_kth_smallest", "prune_lowest_", "repack", "act_sq_accumulate_")
ALL_OPS = CPP_OPS + ("block_reduce", "ema_update_", "scores")


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
    if want in ("triton", "cuda"):
        raise RuntimeError(
            f"TSPRUNE_KERNELS_BACKEND={want} but this build has no {want} implementation of {op!r} yet"
        )
    if has_cpp:
        if _C is not None:
            return Choice("cpp", "compiled extension tsprune_kernels._C loaded")
        _note_missing_extension()
        return Choice("torch", f"extension not loaded: {_C_ERROR}")
    if op in CPP_OPS:
        return Choice("torch", f"no {dev} kernel in this build")
    return Choice("torch", "implemented as a few fused torch ops on every device")


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
