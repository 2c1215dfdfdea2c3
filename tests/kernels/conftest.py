"""Kernel tests run once per backend that exists on this machine.

``backend`` parametrises a test over the implementations of the CPU ops: ``torch`` (the reference,
always there) and ``cpp`` (the compiled extension). Without the extension the cpp cases skip with
the reason, unless TSPRUNE_REQUIRE_CPP=1 (CI sets it), where they fail: a missing build must not
pass silently.
"""
import os

import pytest
import torch

from tsprune_kernels import _backend

BACKENDS = ["torch", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    name = request.param
    if name == "cpp" and not _backend.cpp_available():
        if os.environ.get("TSPRUNE_REQUIRE_CPP") == "1":
            pytest.fail(f"TSPRUNE_REQUIRE_CPP=1 but the C++ extension did not load: {_backend._C_ERROR}")
        pytest.skip(f"C++ extension not built: {_backend._C_ERROR}")
    monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", name)
    return name


@pytest.fixture
def gen():
    """A fresh, randomly seeded generator per test (inputs differ from run to run; the seed is
    printed on failure so a failing case can be replayed)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
