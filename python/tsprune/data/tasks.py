"""Forecasting tasks: the three splits of one series set, scaled and cut into windows.

Stage of the flow: a source (a CSV file through :mod:`.sources`, or synthetic series from
:mod:`.synthetic`) -> protocol (split, scaler) -> windows -> **ForecastTask** -> pruner /
fine-tuner / evaluator. Both kinds of source meet in :func:`task_from_array`, so a synthetic task
is the same object as a benchmark one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .protocol import StandardScaler, split_borders
from .sources import _dataset_key, infer_frequency, load_csv, resolve_csv
from .synthetic import generate
from .windows import WindowDataset

__all__ = ["ForecastTask", "make_task", "task_from_array", "synthetic_task"]


@dataclass
class ForecastTask:
    """One downstream forecasting task: windows of the three splits, already scaled."""

    name: str
    lookback: int
    horizon: int
    train: WindowDataset
    val: WindowDataset
    test: WindowDataset
    scaler: StandardScaler
    columns: list[str]
    borders: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_vars(self) -> int:
        return len(self.columns)

    def describe(self) -> str:
        """The task in a few readable lines (for the log)."""
        freq = self.meta.get("freq") or "unknown"

        def w(ds: WindowDataset) -> str:
            n, m = len(ds), ds.n_available
            return f"{n:,} windows" if n == m else f"{n:,} of {m:,} windows (capped)"

        lines = [f"task {self.name}: {self.n_vars} variables, frequency {freq}, lookback {self.lookback}, "
                 f"horizon {self.horizon}, channel-independent, scaler fitted on train"]
        if self.source:
            lines.append(f"  source: {self.source}")
        for k, ds in (("train", self.train), ("val", self.val), ("test", self.test)):
            rows = ""
            if self.borders is not None:
                a, b = self.borders[("train", "val", "test").index(k)]
                rows = f"rows {a}..{b}, "
            lines.append(f"  {k:5s}: {rows}{w(ds)} (stride {ds.stride})")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "lookback": self.lookback,
            "horizon": self.horizon,
            "n_vars": self.n_vars,
            "freq": self.meta.get("freq"),
            "borders": self.borders,
            **{
                f"{k}_windows": len(getattr(self, k)) for k in ("train", "val", "test")
            },
            **{
                f"{k}_windows_available": getattr(self, k).n_available
                for k in ("train", "val", "test")
            },
        }


def task_from_array(
    name: str,
    values: np.ndarray,
    columns: Sequence[str] | None,
    lookback: int,
    horizon: int,
    *,
    max_train_windows: int | None = None,
    max_eval_windows: int | None = None,
    train_stride: int = 1,
    eval_stride: int = 1,
    source: str | None = None,
    split_name: str | None = None,
    freq: str | None = None,
) -> ForecastTask:
    """Build a task from raw ``values [rows, vars]``: split (scheme from ``split_name`` or ``name``),
    fit the scaler on the train rows, scale everything, cut the windows. ``freq`` (e.g. "hourly")
    is kept in ``task.meta["freq"]`` for the seasonal-naive baseline."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be [rows, vars], got shape {values.shape}")
    if columns is None:
        columns = [f"var_{i}" for i in range(values.shape[1])]
    columns = [str(c) for c in columns]
    if len(columns) != values.shape[1]:
        raise ValueError(f"{len(columns)} column names for {values.shape[1]} variables")
    borders = split_borders(split_name or name, values.shape[0], lookback, horizon)
    (tr0, tr1), (va0, va1), (te0, te1) = borders
    scaler = StandardScaler().fit(values[tr0:tr1])
    used = values[: max(tr1, va1, te1)]
    scaled = scaler.transform(used)

    def ds(split: str, a: int, b: int, stride: int, cap: int | None) -> WindowDataset:
        return WindowDataset(
            scaled[a:b], lookback, horizon, stride, cap, row_offset=a, name=f"{name}/{split}"
        )

    return ForecastTask(
        name=name,
        lookback=int(lookback),
        horizon=int(horizon),
        train=ds("train", tr0, tr1, train_stride, max_train_windows),
        val=ds("val", va0, va1, eval_stride, max_eval_windows),
        test=ds("test", te0, te1, eval_stride, max_eval_windows),
        scaler=scaler,
        columns=columns,
        borders=borders,
        source=source,
        meta={"freq": freq},
    )


def make_task(
    name_or_path: str | os.PathLike,
    lookback: int,
    horizon: int,
    data_dir: str | os.PathLike | None = None,
    max_train_windows: int | None = None,
    max_eval_windows: int | None = None,
    train_stride: int = 1,
    eval_stride: int = 1,
) -> ForecastTask:
    """Load a benchmark CSV (see :func:`resolve_csv`) and build its :class:`ForecastTask`.

    ``"synthetic"`` (or ``"synthetic:<seed>"``) gives the bundled offline task of
    :func:`synthetic_task` instead.
    """
    raw = os.fspath(name_or_path)
    if raw == "synthetic" or raw.startswith("synthetic:"):
        seed = int(raw.split(":", 1)[1]) if ":" in raw else 0
        return synthetic_task(
            lookback,
            horizon,
            seed,
            max_train_windows=max_train_windows,
            max_eval_windows=max_eval_windows,
            train_stride=train_stride,
            eval_stride=eval_stride,
        )
    path = resolve_csv(raw, data_dir)
    values, columns = load_csv(path, min_rows=lookback + horizon)
    name = _dataset_key(path.name)
    freq = infer_frequency(path)
    return task_from_array(
        name,
        values,
        columns,
        lookback,
        horizon,
        max_train_windows=max_train_windows,
        max_eval_windows=max_eval_windows,
        train_stride=train_stride,
        eval_stride=eval_stride,
        source=str(path),
        freq=freq,
    )


def synthetic_task(
    lookback: int,
    horizon: int,
    seed: int = 0,
    n_vars: int = 4,
    length: int = 4000,
    *,
    max_train_windows: int | None = None,
    max_eval_windows: int | None = None,
    train_stride: int = 1,
    eval_stride: int = 1,
) -> ForecastTask:
    """The bundled offline task: ``n_vars`` synthetic variables of ``length`` rows, 70/10/20 split,
    scaler fitted on train; the same :class:`ForecastTask` as ``make_task``."""
    values = generate(n_vars, length, seed).T  # [rows, vars]
    task = task_from_array(
        f"synthetic-{seed}",
        values,
        [f"syn_{i}" for i in range(n_vars)],
        lookback,
        horizon,
        max_train_windows=max_train_windows,
        max_eval_windows=max_eval_windows,
        train_stride=train_stride,
        eval_stride=eval_stride,
        source=f"synthetic(seed={seed}, n_vars={n_vars}, length={length})",
        split_name="synthetic",
    )
    task.meta.update({"seed": seed, "n_vars": n_vars, "length": length})
    return task
