"""Where the numbers come from, part 1: benchmark CSV files and the named data sets.

Stage of the flow: **name or path -> CSV file -> values float32 [rows, vars]** -> protocol
(split, scale) -> windows.

Files are in the long-horizon layout: a ``date`` column first, then one numeric column per variable.
A file is found by :func:`resolve_csv` (explicit path, ``data_dir``, ``$TSPRUNE_DATA_DIR``,
``../shared/data`` next to the repository, the user cache, then a one-time download for the ETT
files). Nothing here is ever written into the repository. (The other source, synthetic series,
is :mod:`tsprune.data.synthetic`.)
"""
from __future__ import annotations

import math
import os
import pathlib
import urllib.request
from typing import Any

import numpy as np

from ..atomic import atomic_write

__all__ = ["KNOWN_URLS", "resolve_csv", "search_dirs", "cache_dir", "load_csv", "infer_frequency"]

ENV_DATA_DIR = "TSPRUNE_DATA_DIR"
ENV_NO_DOWNLOAD = "TSPRUNE_NO_DOWNLOAD"
DOWNLOAD_TIMEOUT_S = 20.0

_ETT_BASE = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/"
#: Public sources for a one-time download into the cache. Only the ETT files have a stable raw URL;
#: the other benchmark files (exchange_rate, national_illness, weather, electricity, traffic) are
#: distributed through archives / drives and must be placed by hand.
KNOWN_URLS: dict[str, str] = {n: f"{_ETT_BASE}{n}.csv" for n in ("ETTh1", "ETTh2", "ETTm1", "ETTm2")}


# --------------------------------------------------------------------------------------------------
# Finding a file
# --------------------------------------------------------------------------------------------------
def _repo_root() -> pathlib.Path:
    # this file is <repo>/python/tsprune/data/sources.py
    return pathlib.Path(__file__).resolve().parents[3]


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
    """Fetch ``url`` to ``dest`` atomically; the temp file must parse as a CSV (an error page or a
    truncated file is never cached)."""
    def fetch(fh):
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                fh.write(chunk)

    atomic_write(dest, fetch, check=load_csv)
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
