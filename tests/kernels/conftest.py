"""Kernel tests run once per backend that exists on this machine.

``backend`` parametrises a test over the implementations of the CPU ops: ``torch`` (the reference,
always there) and ``cpp`` (the compiled extension). Without the extension the cpp cases skip with
the reason, unless TSPRUNE_REQUIRE_CPP=1 (CI sets it), where they fail: a missing build must not
pass silently. On a machine with a CUDA GPU a third case, ``triton``, runs the same tests on CUDA
tensors with TSPRUNE_KERNELS_BACKEND=triton: it makes cuda the default device (tensors the tests
create land there, ``gen`` is a CUDA generator, ScoreArena defaults to cuda) for that case only.

The package reads TSPRUNE_KERNELS_BACKEND once, at import; ``tsprune_kernels.set_backend`` changes
the forced backend at run time. The tests here force a backend the pytest way,
``monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", name)``: the ``monkeypatch`` fixture of this
directory passes every such change (and its undo) on to ``set_backend``.
"""
import os

import pytest
import torch

from tsprune_kernels import _backend

_VAR = "TSPRUNE_KERNELS_BACKEND"


class _BackendMonkeyPatch(pytest.MonkeyPatch):
    """pytest's MonkeyPatch; setting, deleting or restoring TSPRUNE_KERNELS_BACKEND also calls
    set_backend with the variable's new value."""

    touched = False

    def setenv(self, name, value, prepend=None):
        super().setenv(name, value, prepend)
        self._sync(name)

    def delenv(self, name, raising=True):
        super().delenv(name, raising)
        self._sync(name)

    def _sync(self, name):
        if name == _VAR:
            self.touched = True
            _backend.set_backend(os.environ.get(_VAR))

    def undo(self):
        super().undo()
        if self.touched:
            self.touched = False
            _backend.set_backend(os.environ.get(_VAR))


@pytest.fixture
def monkeypatch():
    mp = _BackendMonkeyPatch()
    yield mp
    mp.undo()

BACKENDS = ["torch", "cpp"] + (["triton"] if torch.cuda.is_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    name = request.param
    if name == "cpp" and not _backend.cpp_available():
        if os.environ.get("TSPRUNE_REQUIRE_CPP") == "1":
            pytest.fail(f"TSPRUNE_REQUIRE_CPP=1 but the C++ extension did not load: {_backend._C_ERROR}")
        pytest.skip(f"C++ extension not built: {_backend._C_ERROR}")
    monkeypatch.setenv("TSPRUNE_KERNELS_BACKEND", name)
    if name == "triton":
        if _backend.triton_impl() is None:
            pytest.fail(f"CUDA is available but the Triton kernels did not import: {_backend._TRITON_ERROR}")
        from tsprune_kernels.arena import ScoreArena

        previous = torch.get_default_device()
        torch.set_default_device("cuda")
        request.addfinalizer(lambda: torch.set_default_device(previous))
        monkeypatch.setattr(ScoreArena.__init__, "__defaults__", ("cuda",))
    return name


@pytest.fixture
def gen(request):
    """A fresh, randomly seeded generator per test (inputs differ from run to run; the seed is
    printed on failure so a failing case can be replayed). On the default device."""
    if "backend" in request.fixturenames:
        request.getfixturevalue("backend")  # the default device is set first
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)
