"""Compatibility shim: the torch backend moved to :mod:`tsprune_kernels.torch_impl` (the test oracle
to tests/kernels/_oracles.py). Every name it defines is importable from here as before."""
from . import torch_impl as _impl

globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})
