"""Helpers shared by the Triton kernels: interpreter detection, dot precision, config lists."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1: kernels run as numpy on the host)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` input precision for fp32 operands: TF32 only where torch itself allows it for
    matmuls (``torch.backends.cuda.matmul.allow_tf32``, off by default), so the masked kernels are
    compared with cuBLAS at the same precision. None (Triton's default) for 16-bit operands."""
    if dtype != torch.float32:
        return None
    if not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's numpy ``tl.dot`` mis-reads bfloat16 operands (no numpy bf16): upcast to
    fp32 before the dot there (exact, and the accumulation is fp32 anyway). Native on GPUs."""
    return interpreting() and dtype == torch.bfloat16


def configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """The autotune list on a GPU; one config (no benchmarking) under the interpreter, and only the
    first GPU config when ``TSPRUNE_TRITON_AUTOTUNE=0`` (read at import: test runs that compile
    many shapes once each, where autotuning would cost more than it saves)."""
    if interpreting():
        return [interp]
    if os.environ.get("TSPRUNE_TRITON_AUTOTUNE", "1") == "0":
        return gpu[:1]
    return gpu


def cfg(num_warps: int = 4, num_stages: int = 3, **kw) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
