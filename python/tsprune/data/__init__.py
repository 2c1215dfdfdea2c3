"""Downstream data: find the series, split and scale them, cut them into windows, score forecasts.

Stage of the flow: **source -> protocol -> windows -> ForecastTask** -> pruner / fine-tuner /
evaluator; metrics score the forecasts. One module per idea, imported one way only:

    sources    CSV files and named data sets (lookup, one-time download, load)     numpy, pandas, ..atomic
    synthetic  synthetic series (pretraining corpus, bundled offline task)          numpy
    protocol   split borders and the train-only StandardScaler                     <- sources
    windows    WindowDataset and batch_indices, the one batching path               torch
    metrics    mse, mae, MetricAccumulator (float64 sums)                           torch
    tasks      ForecastTask, task_from_array, make_task, synthetic_task             <- all above

``from tsprune.data import X`` works for every name the former single module ``data.py`` had; each
is loaded from its module on first use (PEP 562), so importing ``tsprune.data.sources`` or
``tsprune.data.synthetic`` alone loads neither the windows nor torch from here.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it (public names first, then the former module's private ones,
# kept importable from here because callers and tests reached them through ``tsprune.data``)
_WHERE = {
    **dict.fromkeys(("KNOWN_URLS", "resolve_csv", "search_dirs", "cache_dir", "load_csv", "infer_frequency",
                     "ENV_DATA_DIR", "ENV_NO_DOWNLOAD", "DOWNLOAD_TIMEOUT_S", "_ETT_BASE", "_repo_root",
                     "_dataset_key", "_find_in", "_download", "_DATE_NAMES", "_mostly_numeric",
                     "urllib"), "sources"),  # tests patch urllib.request.urlopen through tsprune.data
    **dict.fromkeys(("split_borders", "StandardScaler", "_ETTH_MONTH", "_ETTM_MONTH"), "protocol"),
    **dict.fromkeys(("WindowDataset", "batch_indices"), "windows"),
    **dict.fromkeys(("ForecastTask", "make_task", "task_from_array", "synthetic_task"), "tasks"),
    **dict.fromkeys(("mse", "mae", "MetricAccumulator", "_pair_f64", "_sums"), "metrics"),
}
_SUBMODULES = ("sources", "synthetic", "protocol", "windows", "metrics", "tasks")

__all__ = [
    "KNOWN_URLS",
    "resolve_csv",
    "search_dirs",
    "cache_dir",
    "load_csv",
    "split_borders",
    "StandardScaler",
    "WindowDataset",
    "batch_indices",
    "ForecastTask",
    "make_task",
    "task_from_array",
    "synthetic_task",
    "mse",
    "mae",
    "MetricAccumulator",
    "infer_frequency",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # loaded once; later lookups (and monkeypatch) see a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE) | set(_SUBMODULES))


if TYPE_CHECKING:  # for type checkers and IDEs: the names above, imported eagerly
    from .metrics import MetricAccumulator, mae, mse
    from .protocol import StandardScaler, split_borders
    from .sources import KNOWN_URLS, cache_dir, infer_frequency, load_csv, resolve_csv, search_dirs
    from .tasks import ForecastTask, make_task, synthetic_task, task_from_array
    from .windows import WindowDataset, batch_indices
