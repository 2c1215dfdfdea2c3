"""The standard long-horizon evaluation protocol: split borders and per-variable scaling.

Stage of the flow: values [rows, vars] (from :mod:`.sources`) -> **row ranges of train / val /
test, a StandardScaler fitted on train** -> windows. The protocol is the one of docs/METHOD.md
(its "Evaluation" item) and of the data folder's README (../shared/data/README.md):

* splits in time order: ETTh*: 12/4/4 months (8640/2880/2880 rows, the rest of the file unused),
  ETTm*: the same x4 (34560/11520/11520), anything else 70/10/20 (train = int(0.7 n),
  test = int(0.2 n), val = the rest); the val and test segments start one lookback before their
  border, so their first context is taken from the previous split;
* one StandardScaler per variable fitted on the train split only (population std, std 0 -> 1).

The rest of the protocol (channel-independent windows, test stride 1, MSE / MAE on scaled values
in float64) is :mod:`.windows` and :mod:`.metrics`.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .sources import _dataset_key

__all__ = ["split_borders", "StandardScaler"]

# Rows of one ETT "month" in the standard protocol (30 days).
_ETTH_MONTH = 30 * 24
_ETTM_MONTH = 30 * 24 * 4


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

    def state_dict(self) -> dict[str, list[float]]:
        self._check()
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Sequence[float]]) -> "StandardScaler":
        return cls(state["mean"], state["std"])
