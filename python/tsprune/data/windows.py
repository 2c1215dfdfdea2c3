"""Channel-independent forecasting windows over a scaled segment, and the one batching path.

Stage of the flow: a scaled segment float32 [rows, vars] (:mod:`.protocol`) -> **windows
(context [lookback], target [horizon])** -> batches for calibration, fine-tuning and evaluation.
Every batch of the package and of the training loops comes from :func:`batch_indices` (the order)
and :meth:`WindowDataset.batch` (the gather).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["WindowDataset", "batch_indices"]


def batch_indices(
    n: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False
) -> Iterator[np.ndarray]:
    """The item indices (int64 [<= batch_size]) of every batch over ``n`` items, in order: ``0..n-1``,
    or with ``shuffle`` the permutation of ``np.random.default_rng(seed)``. This is the global order
    of calibration and fine-tuning (data-parallel ranks each take their shard of every batch, see
    tsprune.distributed.shard), so a seed gives the same batches in every process and every run.
    ``drop_last`` drops a final batch smaller than ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx = np.arange(n)
    if shuffle:
        np.random.default_rng(seed).shuffle(idx)  # the same permutation as rng.permutation(n)
    for a in range(0, n, batch_size):
        sel = idx[a : a + batch_size]
        if drop_last and len(sel) < batch_size:
            break
        yield sel


class WindowDataset(Dataset):
    """Channel-independent forecasting windows over a scaled segment ``data [rows, vars]``.

    Window ``w`` of variable ``v`` starts at row ``s = w * stride`` of the segment:
    context = ``data[s : s + lookback, v]``, target = ``data[s + lookback : s + lookback + horizon, v]``.
    ``n_per_var = (rows - lookback - horizon) // stride + 1``.

    Index order is **variable-major**: global index ``g = v * n_per_var + w`` (all windows of
    variable 0, then variable 1, ...). With ``max_windows`` smaller than the ``n_available``
    windows, a deterministic, evenly spaced subset of the global indices is kept
    (``floor(i * n_available / max_windows)``), so every variable keeps about the same share.
    ``n_available`` always reports how many windows there were before subsampling.

    Items are ``(context float32 [lookback], target float32 [horizon])`` tensors; :meth:`batch`
    gathers many at once (much faster than a DataLoader over single items).
    """

    def __init__(
        self,
        data: np.ndarray,
        lookback: int,
        horizon: int,
        stride: int = 1,
        max_windows: int | None = None,
        *,
        row_offset: int = 0,
        name: str = "",
    ):
        arr = np.asarray(data, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise ValueError(f"WindowDataset expects data [rows, vars], got shape {arr.shape}")
        if lookback < 1 or horizon < 1 or stride < 1:
            raise ValueError(f"lookback, horizon, stride must be >= 1 (got {lookback}, {horizon}, {stride})")
        rows, n_vars = arr.shape
        if rows < lookback + horizon:
            raise ValueError(
                f"{name or 'segment'}: {rows} rows, fewer than lookback {lookback} + horizon {horizon}"
            )
        if n_vars < 1:
            raise ValueError(f"{name or 'segment'}: no variables")
        self.name = name
        self.lookback = int(lookback)
        self.horizon = int(horizon)
        self.stride = int(stride)
        self.row_offset = int(row_offset)
        # [vars, rows], contiguous per variable, so one window is a contiguous slice
        self.series = np.ascontiguousarray(arr.T)
        self.n_vars = n_vars
        self.n_rows = rows
        self.n_per_var = (rows - lookback - horizon) // stride + 1
        self.n_available = self.n_per_var * n_vars
        if max_windows is not None and max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        if max_windows is not None and max_windows < self.n_available:
            self.indices: np.ndarray | None = (
                np.arange(max_windows, dtype=np.int64) * self.n_available // max_windows
            )
        else:
            self.indices = None
        self.max_windows = max_windows

    # ---- index bookkeeping ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_available if self.indices is None else len(self.indices)

    @property
    def subsampled(self) -> bool:
        return self.indices is not None

    def global_index(self, idx: np.ndarray | int) -> np.ndarray:
        i = np.asarray(idx, dtype=np.int64)
        n = len(self)
        if np.any(i < -n) or np.any(i >= n):
            raise IndexError(f"window index out of range for {n} windows")
        i = np.where(i < 0, i + n, i)
        return i if self.indices is None else self.indices[i]

    def locate(self, idx: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Variable and start row (within the segment) of dataset item(s) ``idx``."""
        g = self.global_index(idx)
        return g // self.n_per_var, (g % self.n_per_var) * self.stride

    def capped(self, max_windows: int | None) -> "WindowDataset":
        """The same windows with a different cap (None: every window); shares the series array."""
        new = object.__new__(WindowDataset)
        new.__dict__.update(self.__dict__)
        if max_windows is not None and max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        if max_windows is not None and max_windows < self.n_available:
            new.indices = np.arange(max_windows, dtype=np.int64) * self.n_available // max_windows
        else:
            new.indices = None
        new.max_windows = max_windows
        return new

    # ---- data ---------------------------------------------------------------------------------
    def batch_numpy(self, idx: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        var, start = self.locate(np.asarray(idx, dtype=np.int64).reshape(-1))
        offs = np.arange(self.lookback + self.horizon, dtype=np.int64)
        win = self.series[var[:, None], start[:, None] + offs[None, :]]
        return win[:, : self.lookback], win[:, self.lookback :]

    def batch(self, idx: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context [n, lookback], target [n, horizon])`` float32 tensors for items ``idx``."""
        c, t = self.batch_numpy(idx)
        return torch.from_numpy(c), torch.from_numpy(t)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        var, start = self.locate(int(idx))
        v, s = int(var), int(start)
        row = self.series[v]
        ctx = torch.from_numpy(row[s : s + self.lookback].copy())
        tgt = torch.from_numpy(row[s + self.lookback : s + self.lookback + self.horizon].copy())
        return ctx, tgt

    def iter_batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(context [B, lookback], target [B, horizon])`` float32 tensors of every batch, in the
        order of :func:`batch_indices` (dataset order, or the seeded permutation)."""
        for sel in batch_indices(len(self), batch_size, shuffle, seed, drop_last):
            yield self.batch(sel)

    def __repr__(self) -> str:
        return (
            f"WindowDataset({self.name or 'segment'}: {len(self)} of {self.n_available} windows, "
            f"vars={self.n_vars}, rows={self.n_rows}, lookback={self.lookback}, "
            f"horizon={self.horizon}, stride={self.stride})"
        )
