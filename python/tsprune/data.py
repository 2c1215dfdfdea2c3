"""Downstream data: find a benchmark CSV, load it, split it, scale it, cut it into windows, score.

Stage of the flow: **CSV -> ForecastTask** -> pruner / fine-tuner / evaluator.

The evaluation protocol is the one of SPEC.md ("Evaluation protocol") and ../shared/data/README.md:

* files in the long-horizon layout: a ``date`` column first, then one numeric column per variable;
* splits in time order: ETTh*: 12/4/4 months (8640/2880/2880 rows, the rest of the file unused),
  ETTm*: the same x4 (34560/11520/11520), anything else 70/10/20 (train = int(0.7 n),
  test = int(0.2 n), val = the rest); the val and test segments start one lookback before their
  border, so their first context is taken from the previous split;
* one StandardScaler per variable fitted on the train split only (population std, std 0 -> 1);
* channel-independent windows (each variable its own univariate series), test stride 1;
* MSE and MAE on the scaled values, accumulated in float64.

A file is found by :func:`resolve_csv` (explicit path, ``data_dir``, ``$TSPRUNE_DATA_DIR``,
``../shared/data`` next to the repository, the user cache, then a one-time download for the ETT
files). Nothing here is ever written into the repository.
"""
from __future__ import annotations

import math
import os
import pathlib
import tempfile
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "KNOWN_URLS",
    "resolve_csv",
    "search_dirs",
    "cache_dir",
    "load_csv",
    "split_borders",
    "StandardScaler",
    "WindowDataset",
    "ForecastTask",
    "make_task",
    "task_from_array",
    "mse",
    "mae",
    "MetricAccumulator",
    "infer_frequency",
]

ENV_DATA_DIR = "TSPRUNE_DATA_DIR"
ENV_NO_DOWNLOAD = "TSPRUNE_NO_DOWNLOAD"
DOWNLOAD_TIMEOUT_S = 20.0

_ETT_BASE = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/"
#: Public sources for a one-time download into the cache. Only the ETT files have a stable raw URL;
#: the other benchmark files (exchange_rate, national_illness, weather, electricity, traffic) are
#: distributed through archives / drives and must be placed by hand.
KNOWN_URLS: dict[str, str] = {n: f"{_ETT_BASE}{n}.csv" for n in ("ETTh1", "ETTh2", "ETTm1", "ETTm2")}

# Rows of one ETT "month" in the standard protocol (30 days).
_ETTH_MONTH = 30 * 24
_ETTM_MONTH = 30 * 24 * 4


# --------------------------------------------------------------------------------------------------
# Finding a file
# --------------------------------------------------------------------------------------------------
def _repo_root() -> pathlib.Path:
    # this file is <repo>/python/tsprune/data.py
    return pathlib.Path(__file__).resolve().parents[2]


def cache_dir() -> pathlib.Path:
    """User cache for downloaded data: ``$XDG_CACHE_HOME/tsprune/data`` or ``~/.cache/tsprune/data``."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = pathlib.Path(base) if base else pathlib.Path.home() / ".cache"
    return root / "tsprune" / "data"


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """The folders :func:`resolve_csv` looks in, in order (duplicates removed)."""
    dirs: list[pathlib.Path] = []
    if data_dir is not None:
        dirs.append(pathlib.Path(data_dir).expanduser())
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        dirs.append(pathlib.Path(env).expanduser())
    dirs.append(_repo_root().parent / "shared" / "data")
    dirs.append(pathlib.Path.cwd().parent / "shared" / "data")
    dirs.append(cache_dir())
    out: list[pathlib.Path] = []
    seen: set[str] = set()
    for d in dirs:
        try:
            key = str(d.resolve())
        except OSError:
            key = str(d.absolute())
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _dataset_key(name: str) -> str:
    """``"ETTh1.csv"`` / ``"/a/b/ETTh1.csv"`` / ``"ETTh1"`` -> ``"ETTh1"``."""
    base = pathlib.PurePath(str(name)).name
    return base[:-4] if base.lower().endswith(".csv") else base


def _find_in(d: pathlib.Path, filename: str) -> pathlib.Path | None:
    p = d / filename
    if p.is_file():
        return p
    if d.is_dir():  # case-insensitive fallback ("etth1" finds ETTh1.csv)
        low = filename.lower()
        try:
            for q in sorted(d.iterdir()):
                if q.name.lower() == low and q.is_file():
                    return q
        except OSError:
            return None
    return None


def _download(url: str, dest: pathlib.Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> pathlib.Path:
    """Fetch ``url`` to ``dest`` atomically (temp file in the same folder, checked, os.replace)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=str(dest.parent))
    try:
        with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(url, timeout=timeout) as resp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                fh.write(chunk)
        load_csv(tmp)  # refuse to cache an error page or a truncated file
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return dest


def resolve_csv(
    name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool | None = None,
) -> pathlib.Path:
    """Find a benchmark CSV.

    An existing file path is returned as is. Otherwise ``"ETTh1"`` / ``"ETTh1.csv"`` (the file name
    of a missing path too) is looked up, in order, in ``data_dir``, ``$TSPRUNE_DATA_DIR``,
    ``<repo>/../shared/data``, ``<cwd>/../shared/data`` and the user cache (see :func:`cache_dir`).
    For the names in :data:`KNOWN_URLS` a missing file is then downloaded once into the cache
    (``download=False`` or ``$TSPRUNE_NO_DOWNLOAD=1`` turns that off).

    Raises FileNotFoundError listing every place searched.
    """
    raw = os.fspath(name_or_path)
    p = pathlib.Path(raw).expanduser()
    if p.is_file():
        return p
    key = _dataset_key(raw)
    if not key:
        raise FileNotFoundError(f"empty data set name: {raw!r}")
    filename = f"{key}.csv"
    searched: list[str] = []
    if raw != key and raw != filename:  # it was given as a path
        searched.append(str(p))
    dirs = search_dirs(data_dir)
    for d in dirs:
        searched.append(str(d / filename))
        hit = _find_in(d, filename)
        if hit is not None:
            return hit

    if download is None:
        download = os.environ.get(ENV_NO_DOWNLOAD, "").strip().lower() not in ("1", "true", "yes")
    url = next((u for k, u in KNOWN_URLS.items() if k.lower() == key.lower()), None)
    note = ""
    if url is not None and download:
        canonical = next(k for k in KNOWN_URLS if k.lower() == key.lower())
        dest = cache_dir() / f"{canonical}.csv"
        try:
            return _download(url, dest)
        except Exception as exc:  # noqa: BLE001 - any failure becomes the not-found error below
            note = f"\ndownload from {url} failed: {type(exc).__name__}: {exc}"
    elif url is not None:
        note = f"\n(download from {url} is disabled)"
    else:
        note = "\n(no public download is known for this name)"
    places = "\n  ".join(searched)
    raise FileNotFoundError(
        f"data file {filename!r} not found; searched:\n  {places}{note}\n"
        f"Put {filename} into one of these folders (e.g. {dirs[-1]}), pass data_dir=..., "
        f"or set {ENV_DATA_DIR} to a folder of CSVs (a 'date' column, then numeric columns)."
    )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
_DATE_NAMES = {"date", "datetime", "time", "timestamp", "ds"}


def load_csv(path: str | os.PathLike, min_rows: int = 1) -> tuple[np.ndarray, list[str]]:
    """Read a long-horizon CSV: a ``date`` column first, then numeric columns.

    Returns ``(values float32 [rows, vars], columns)``. The first column is dropped when it is
    named like a date (date/datetime/time/timestamp/ds) or is not numeric; every other column must
    be numeric and finite. Row numbers in errors are 0-based data rows (file line = row + 2).
    """
    import pandas as pd

    path = pathlib.Path(path)
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except pd.errors.EmptyDataError as exc:
        raise ValueError(f"{path}: empty CSV file") from exc
    except pd.errors.ParserError as exc:
        raise ValueError(f"{path}: malformed CSV: {exc}") from exc
    if df.shape[1] == 0:
        raise ValueError(f"{path}: no columns")
    first = df.columns[0]
    drop_first = str(first).strip().lower() in _DATE_NAMES or not pd.api.types.is_numeric_dtype(
        df[first]
    ) and not _mostly_numeric(df[first])
    data = df.iloc[:, 1:] if drop_first else df
    columns = [str(c) for c in data.columns]
    if not columns:
        raise ValueError(f"{path}: no numeric columns after the date column {str(first)!r}")
    if len(data) < min_rows:
        raise ValueError(f"{path}: {len(data)} data rows, at least {min_rows} needed")
    out = np.empty((len(data), len(columns)), dtype=np.float32)
    for j, col in enumerate(columns):
        s = data.iloc[:, j]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            bad = np.flatnonzero(np.isnan(v) & s.notna().to_numpy())
            if bad.size:
                r = int(bad[0])
                raise ValueError(
                    f"{path}: column {col!r} has a non-numeric value {s.iloc[r]!r} at data row {r} "
                    f"(file line {r + 2}); {bad.size} such value(s) in that column"
                )
        nan = np.flatnonzero(np.isnan(v))
        if nan.size:
            r = int(nan[0])
            raise ValueError(
                f"{path}: column {col!r} has a missing value (NaN) at data row {r} "
                f"(file line {r + 2}); {nan.size} missing value(s) in that column"
            )
        inf = np.flatnonzero(~np.isfinite(v))
        if inf.size:
            r = int(inf[0])
            raise ValueError(
                f"{path}: column {col!r} has a non-finite value {v[r]} at data row {r} (file line {r + 2})"
            )
        out[:, j] = v
    return out, columns


def infer_frequency(path: str | os.PathLike) -> str | None:
    """The sampling frequency of a long-horizon CSV from its first (date) column: the median step
    between consecutive timestamps, named ``"15min"``, ``"hourly"``, ``"daily"``, ``"weekly"`` or
    ``"monthly"`` (within 10%); None when the column is not dates or the step is none of these."""
    import pandas as pd

    try:
        col = pd.read_csv(path, usecols=[0], skipinitialspace=True).iloc[:, 0]
        ts = pd.to_datetime(col, errors="coerce")
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    if ts.isna().mean() > 0.5 or len(ts) < 3:
        return None
    step = ts.dropna().diff().dropna().dt.total_seconds().median()
    if not step or not math.isfinite(step) or step <= 0:
        return None
    for name, sec in (("15min", 900), ("hourly", 3600), ("daily", 86400), ("weekly", 7 * 86400),
                      ("monthly", 30.44 * 86400)):
        if abs(step - sec) <= 0.1 * sec:
            return name
    return None


def _mostly_numeric(s: Any) -> bool:
    import pandas as pd

    v = pd.to_numeric(s, errors="coerce")
    ok = v.notna().sum()
    return bool(ok > 0 and ok >= 0.5 * s.notna().sum())


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------
def split_borders(
    name: str | os.PathLike,
    n_rows: int,
    lookback: int,
    horizon: int | None = None,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Row ranges ``((train_start, train_end), (val_start, val_end), (test_start, test_end))``.

    ``name`` (a data set name or a path; its file stem decides) picks the scheme: ``ETTh*``
    8640/2880/2880, ``ETTm*`` 34560/11520/11520, else 70/10/20 (train = int(0.7 n),
    test = int(0.2 n), val = the rest). Val and test start ``lookback`` rows before their border.
    With ``horizon`` given, every split must hold at least one window (lookback + horizon rows).
    """
    if lookback < 1:
        raise ValueError(f"lookback must be >= 1, got {lookback}")
    if horizon is not None and horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    key = _dataset_key(os.fspath(name)).lower()
    if key.startswith("etth") or key.startswith("ettm"):
        month = _ETTH_MONTH if key.startswith("etth") else _ETTM_MONTH
        n_train, n_val, n_test = 12 * month, 4 * month, 4 * month
        if n_rows < n_train + n_val + n_test:
            raise ValueError(
                f"{key}: the ETT split needs {n_train + n_val + n_test} rows "
                f"({n_train}/{n_val}/{n_test}), the file has {n_rows}"
            )
        b_train, b_val, b_test = n_train, n_train + n_val, n_train + n_val + n_test
    else:
        n_train = int(n_rows * 0.7)
        n_test = int(n_rows * 0.2)
        n_val = n_rows - n_train - n_test
        b_train, b_val, b_test = n_train, n_train + n_val, n_rows
    if b_train < lookback:
        raise ValueError(
            f"{key}: series too short: the train split has {b_train} rows, fewer than the "
            f"lookback {lookback} that the val split borrows from it ({n_rows} rows in all)"
        )
    borders = ((0, b_train), (b_train - lookback, b_val), (b_val - lookback, b_test))
    if horizon is not None:
        need = lookback + horizon
        for split, (a, b) in zip(("train", "val", "test"), borders):
            if b - a < need:
                raise ValueError(
                    f"{key}: series too short for lookback {lookback} + horizon {horizon}: the "
                    f"{split} segment has {b - a} rows (rows {a}..{b}), needs >= {need} "
                    f"({n_rows} rows in all)"
                )
    return borders


# --------------------------------------------------------------------------------------------------
# Scaling
# --------------------------------------------------------------------------------------------------
class StandardScaler:
    """Per-variable standardisation ``(x - mean) / std`` over the last axis (population std).

    Statistics are computed in float64; a variable with std 0 gets std 1.
    """

    def __init__(self, mean: np.ndarray | None = None, std: np.ndarray | None = None):
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = None if std is None else np.asarray(std, dtype=np.float64)

    def fit(self, x: np.ndarray) -> "StandardScaler":
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"StandardScaler.fit expects [rows>0, vars], got shape {x.shape}")
        self.mean = x.mean(axis=0)
        std = x.std(axis=0)
        std[~(std > 0)] = 1.0
        self.std = std
        return self

    def _check(self) -> None:
        if self.mean is None or self.std is None:
            raise RuntimeError("StandardScaler is not fitted")

    def transform(self, x: np.ndarray) -> np.ndarray:
        """[..., vars] -> float32 scaled values."""
        self._check()
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def inverse_transform(self, x: np.ndarray, var: int | np.ndarray | None = None) -> np.ndarray:
        """Back to the original units. ``var`` selects the variable(s) for channel-independent
        arrays (e.g. a forecast [horizon] of variable 3); otherwise the last axis is the variables."""
        self._check()
        x = np.asarray(x, dtype=np.float64)
        if var is None:
            return (x * self.std + self.mean).astype(np.float32)
        v = np.asarray(var)
        m, s = self.mean[v], self.std[v]
        if v.ndim == 1:  # one variable per leading row: broadcast over the trailing (time) axis
            shape = (-1,) + (1,) * (x.ndim - 1)
            m, s = m.reshape(shape), s.reshape(shape)
        return (x * s + m).astype(np.float32)

    inverse = inverse_transform

    def state_dict(self) -> dict[str, list[float]]:
        self._check()
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Sequence[float]]) -> "StandardScaler":
        return cls(state["mean"], state["std"])


# --------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------
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
        """Batches in dataset order (or a seeded permutation)."""
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        for a in range(0, n, batch_size):
            sel = order[a : a + batch_size]
            if drop_last and len(sel) < batch_size:
                break
            yield self.batch(sel)

    def __repr__(self) -> str:
        return (
            f"WindowDataset({self.name or 'segment'}: {len(self)} of {self.n_available} windows, "
            f"vars={self.n_vars}, rows={self.n_rows}, lookback={self.lookback}, "
            f"horizon={self.horizon}, stride={self.stride})"
        )


# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------
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
    :func:`tsprune.synthetic.synthetic_task` instead.
    """
    raw = os.fspath(name_or_path)
    if raw == "synthetic" or raw.startswith("synthetic:"):
        from .synthetic import synthetic_task

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


# --------------------------------------------------------------------------------------------------
# Metrics (on scaled values)
# --------------------------------------------------------------------------------------------------
def _pair_f64(pred: Any, target: Any) -> tuple[Any, Any]:
    if isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor):
        p = torch.as_tensor(pred).detach()
        t = torch.as_tensor(target).detach()
        dev = p.device if p.device.type != "cpu" else t.device
        p, t = p.to(dev, torch.float64), t.to(dev, torch.float64)
    else:
        p = np.asarray(pred, dtype=np.float64)
        t = np.asarray(target, dtype=np.float64)
    if tuple(p.shape) != tuple(t.shape):
        raise ValueError(f"pred shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    return p, t


def _sums(pred: Any, target: Any) -> tuple[float, float, int]:
    p, t = _pair_f64(pred, target)
    d = p - t
    if isinstance(d, torch.Tensor):
        return float((d * d).sum().item()), float(d.abs().sum().item()), int(d.numel())
    return float(np.sum(d * d)), float(np.sum(np.abs(d))), int(d.size)


def mse(pred: Any, target: Any) -> float:
    """Mean squared error over all elements, computed in float64."""
    s2, _, n = _sums(pred, target)
    if n == 0:
        raise ValueError("mse of empty arrays")
    return s2 / n


def mae(pred: Any, target: Any) -> float:
    """Mean absolute error over all elements, computed in float64."""
    _, s1, n = _sums(pred, target)
    if n == 0:
        raise ValueError("mae of empty arrays")
    return s1 / n


class MetricAccumulator:
    """Streaming MSE / MAE over batches; sums kept in float64 (exact regardless of batching)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sq = 0.0
        self.abs = 0.0
        self.n = 0

    def update(self, pred: Any, target: Any) -> "MetricAccumulator":
        s2, s1, n = _sums(pred, target)
        self.sq += s2
        self.abs += s1
        self.n += n
        return self

    def merge(self, other: "MetricAccumulator") -> "MetricAccumulator":
        self.sq += other.sq
        self.abs += other.abs
        self.n += other.n
        return self

    def result(self) -> dict[str, float | int]:
        if self.n == 0:
            return {"mse": math.nan, "mae": math.nan, "n": 0}
        return {"mse": self.sq / self.n, "mae": self.abs / self.n, "n": self.n}
