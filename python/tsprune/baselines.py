"""Reference forecasters scored on exactly the run's test windows: seasonal naive and a linear map.

Stage of the flow: ForecastTask (tsprune.data) -> **baselines** -> rows of the results table (cli.py).

* ``seasonal_naive``: the last full season of the context repeated over the horizon,
  ``forecast[t] = context[L - P + (t mod P)]``; the period ``P`` comes from the data frequency
  (:func:`seasonal_period`: 24 hourly, 7 daily, 52 weekly, 96 for 15-minute data, 12 monthly).
  With an unknown frequency, or a period longer than the lookback, it repeats the last value.
  No parameters.
* ``linear``: one channel-independent ridge map from the lookback window to the horizon, NLinear
  style: the context's last value is subtracted from context and target, ``y - x_L = (x - x_L) W + b``
  (``W`` float64 [L, H], ``b`` [H], the intercept not penalised). Fitted in closed form from the
  train windows' sufficient statistics (one eigendecomposition of the centred Gram matrix serves
  every ridge strength); the ridge strength is the one with the lowest validation MSE. Parameters
  ``L * H + H``.

Both predict on scaled values, like the models, so their MSE / MAE compare with the table's rows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .data import ForecastTask, MetricAccumulator, WindowDataset

__all__ = ["seasonal_period", "seasonal_naive", "seasonal_naive_metrics", "LinearBaseline", "fit_linear",
           "run_baselines", "DEFAULT_ALPHAS"]

#: Ridge strengths tried on validation, relative to the mean diagonal of the centred train Gram
#: matrix (lambda = alpha * trace(G) / L); 0 is the minimum-norm least-squares solution.
DEFAULT_ALPHAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

_PERIODS = {"15min": 96, "hourly": 24, "daily": 7, "weekly": 52, "monthly": 12}


def seasonal_period(freq: str | None) -> int | None:
    """Season length for a frequency name (``"hourly"`` -> 24, ``"daily"`` -> 7, ``"weekly"`` -> 52,
    ``"15min"`` -> 96, ``"monthly"`` -> 12); None for an unknown / missing frequency."""
    return _PERIODS.get(str(freq).lower()) if freq else None


def seasonal_naive(context: np.ndarray, horizon: int, period: int | None) -> np.ndarray:
    """context float [B, L] -> forecast float64 [B, horizon]: ``context[:, L - P + (t mod P)]``;
    the last value repeated when ``period`` is None or longer than L."""
    c = np.asarray(context, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"seasonal_naive: context must be [B, L], got shape {c.shape}")
    if horizon < 1:
        raise ValueError(f"seasonal_naive: horizon must be >= 1, got {horizon}")
    L = c.shape[1]
    if not period or period > L:
        return np.repeat(c[:, -1:], horizon, axis=1)
    idx = L - period + (np.arange(horizon) % period)
    return c[:, idx]


def _iter(ds: WindowDataset, batch: int):
    for a in range(0, len(ds), batch):
        c, t = ds.batch_numpy(np.arange(a, min(a + batch, len(ds))))
        yield c.astype(np.float64), t.astype(np.float64)


@dataclass
class LinearBaseline:
    """The fitted NLinear-style ridge map: ``predict(x) = x_L + (x - x_L) @ W + b``.

    W float64 [L, H], b float64 [H]; ``alpha`` / ``lam`` the chosen ridge strength (relative /
    absolute); ``val_mse`` the validation MSE of every alpha tried."""

    W: np.ndarray
    b: np.ndarray
    alpha: float
    lam: float
    val_mse: dict[float, float] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return int(self.W.size + self.b.size)

    def predict(self, context: np.ndarray) -> np.ndarray:
        """context [B, L] -> forecast float64 [B, H]."""
        c = np.asarray(context, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != self.W.shape[0]:
            raise ValueError(f"LinearBaseline.predict: context must be [B, {self.W.shape[0]}], got {c.shape}")
        last = c[:, -1:]
        return last + (c - last) @ self.W + self.b


def _solve_all(e: np.ndarray, Q: np.ndarray, QtC: np.ndarray, lams) -> list[np.ndarray]:
    """W(lam) = Q diag(1 / (e + lam)) Q^T C for each lam; directions with e + lam below the
    numerical rank cut-off are dropped (lam 0: the minimum-norm least-squares solution)."""
    cut = max(float(e.max()), 1e-300) * len(e) * np.finfo(np.float64).eps
    out = []
    for lam in lams:
        d = e + lam
        inv = np.where(d > cut, 1.0 / np.where(d > cut, d, 1.0), 0.0)
        out.append(Q @ (inv[:, None] * QtC))
    return out


def fit_linear(train: WindowDataset, val: WindowDataset | None = None, alphas=DEFAULT_ALPHAS,
               batch: int = 4096) -> LinearBaseline:
    """Fit on every window of ``train``; pick alpha by MSE on ``val`` (the first alpha without val).

    Statistics in float64: n, sum x', sum y', X'^T X' [L, L], X'^T Y' [L, H] with x' = x - x_L,
    y' = y - x_L. Seconds on CPU for ETTh1 (56K windows, L 512, H 96)."""
    alphas = [float(a) for a in alphas]
    if not alphas or any(not math.isfinite(a) or a < 0 for a in alphas):
        raise ValueError(f"fit_linear: alphas must be finite and >= 0, got {alphas}")
    L, H = train.lookback, train.horizon
    n, sx, sy = 0, np.zeros(L), np.zeros(H)
    G, C = np.zeros((L, L)), np.zeros((L, H))
    for c, t in _iter(train, batch):
        last = c[:, -1:]
        x, y = c - last, t - last
        n += len(x)
        sx += x.sum(0)
        sy += y.sum(0)
        G += x.T @ x
        C += x.T @ y
    if n == 0:
        raise ValueError("fit_linear: the train split has no windows")
    mx, my = sx / n, sy / n
    Gc = G - n * np.outer(mx, mx)
    Cc = C - n * np.outer(mx, my)
    Gc = 0.5 * (Gc + Gc.T)
    e, Q = np.linalg.eigh(Gc)
    e = np.clip(e, 0.0, None)
    scale = max(float(np.trace(Gc)) / L, 1e-12)
    lams = [a * scale for a in alphas]
    Ws = _solve_all(e, Q, Q.T @ Cc, lams)
    bs = [my - mx @ W for W in Ws]
    scores: dict[float, float] = {}
    if val is not None and len(alphas) > 1:
        sq = np.zeros(len(alphas))
        cnt = 0
        Wcat = np.concatenate(Ws, axis=1)  # [L, H * n_alphas]: all alphas in one product
        bcat = np.concatenate(bs)
        for c, t in _iter(val, batch):
            last = c[:, -1:]
            p = ((c - last) @ Wcat + bcat).reshape(len(c), len(alphas), H) + last[:, :, None]
            sq += ((p - t[:, None, :]) ** 2).sum(axis=(0, 2))
            cnt += t.size
        scores = {a: float(s / cnt) for a, s in zip(alphas, sq)}
        best = min(range(len(alphas)), key=lambda i: (sq[i], i))
    else:
        best = 0
    return LinearBaseline(W=Ws[best], b=bs[best], alpha=alphas[best], lam=lams[best], val_mse=scores)


def _score(predict, ds: WindowDataset, batch: int) -> dict:
    acc = MetricAccumulator()
    for c, t in _iter(ds, batch):
        acc.update(predict(c), t)
    r = acc.result()
    return {"mse": r["mse"], "mae": r["mae"]}


def seasonal_naive_metrics(task: ForecastTask, batch: int = 4096) -> dict:
    """Seasonal naive on ``task.test`` (its period from the task's frequency):
    ``{mse, mae, params, test_windows, period, rule, freq, seconds}``."""
    period = seasonal_period(task.meta.get("freq"))
    t = time.time()
    return {**_score(lambda c: seasonal_naive(c, task.horizon, period), task.test, batch), "params": 0,
            "test_windows": len(task.test), "test_windows_available": task.test.n_available,
            "period": period if period and period <= task.lookback else None,
            "rule": (f"repeat the last {period} steps" if period and period <= task.lookback
                     else "repeat the last value"), "freq": task.meta.get("freq"),
            "seconds": round(time.time() - t, 2)}


def run_baselines(task: ForecastTask, alphas=DEFAULT_ALPHAS, batch: int = 4096) -> dict:
    """Both baselines on ``task.test`` (exactly its windows, capped or not):
    ``{"seasonal_naive": {mse, mae, params, period, ...}, "linear": {mse, mae, params, alpha, ...}}``."""
    common = {"test_windows": len(task.test), "test_windows_available": task.test.n_available}
    sn = seasonal_naive_metrics(task, batch)
    t = time.time()
    lin = fit_linear(task.train, task.val, alphas, batch)
    ln = {**_score(lin.predict, task.test, batch), "params": lin.params, **common, "alpha": lin.alpha,
          "ridge_lambda": lin.lam, "val_mse_by_alpha": {str(k): v for k, v in lin.val_mse.items()},
          "train_windows": len(task.train), "seconds": round(time.time() - t, 2)}
    return {"seasonal_naive": sn, "linear": ln}
