"""Compatibility shim: repacking moved to :mod:`tsprune.repack` (fold_masks_, repack_model,
load_exact) and the saved form to :mod:`tsprune.checkpoint` (save_pruned, load_pruned). The Plan
itself is :class:`tsprune.adapters.base.Plan`. Every name of the former module stays importable."""
import os  # noqa: F401 - kept as an attribute: callers reach os (e.g. os.fsync) through this module

from .adapters.base import Adapter, Plan, Site  # noqa: F401
from .checkpoint import (  # noqa: F401
    _FILES,
    _HASHED,
    _LEGACY_AGE_S,
    _SAFE_DTYPE,
    _STALE_AGE_S,
    _STORAGE_DTYPES,
    FORMAT_VERSION,
    _DirLock,
    _pid_alive,
    _remove_stale,
    _sha256,
    _stored_tensors,
    _umask,
    load_pruned,
    save_pruned,
)
from .repack import _index, _tied_slots, fold_masks_, load_exact, repack_model  # noqa: F401

__all__ = ["fold_masks_", "repack_model", "load_exact", "save_pruned", "load_pruned", "Plan"]
