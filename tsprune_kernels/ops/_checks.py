"""Integer argument checks shared by every op, before any backend sees the value.

The compiled kernels take int64; a Python int outside that range (or a negative size) would reach
pybind11 as an "incompatible function arguments" dump, and a huge one would overflow index maths.
Every public op validates its integer arguments here, so each backend gets the same clean error.
"""
from __future__ import annotations

import operator

INT64_MAX = 2**63 - 1
SIZE_MAX = 2**62  # block sizes / unit counts: products with small factors stay inside int64


def as_int(op: str, name: str, v, lo: int = 0, hi: int | None = INT64_MAX) -> int:
    """``v`` as a Python int in [lo, hi] (hi None: no upper bound, for counts the op caps itself);
    TypeError for a non-integer (bool included), ValueError
    naming the op and argument for a value out of range."""
    if isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be an int, got bool")
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}") from None
    if i < lo:
        raise ValueError(f"{op}: {name} must be >= {lo}, got {i}")
    if hi is not None and i > hi:
        raise ValueError(f"{op}: {name} must be <= {hi}, got {i} (out of range)")
    return i
