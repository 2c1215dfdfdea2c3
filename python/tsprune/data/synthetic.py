"""Where the numbers come from, part 2: synthetic series, for pretraining the embedded default
model (tsprune.corpus) and for the bundled offline task (:func:`tsprune.data.synthetic_task`).

Stage of the flow: **generator -> values float32 [series, length]** -> (pretraining corpus |
ForecastTask). Needs numpy only.

Every series is a random mix of

* a Gaussian-process sample with a sum of kernels (RBF + periodic + linear). All three are drawn in
  O(length) per series: the RBF part by random Fourier features evaluated on a coarse grid and
  linearly interpolated (it is smooth on the scale of its length-scale), the periodic part as a
  truncated Fourier series whose coefficient variances follow the periodic kernel's spectrum
  (``exp(-k^2 l^2 / 2)``-like decay over harmonics k), the linear part as a random slope/intercept;
* a trend (linear, saturating or piecewise linear);
* one to three seasonalities with "daily / weekly"-like periods (24, 168, 96, 7, 12, 52, ...),
  each a few harmonics with random phases, optionally with slowly drifting amplitude;
* level shifts at random times;
* noise: Gaussian or Student-t, white or AR(1).

Then a random offset and scale. Deterministic for a seed: series ``i`` comes from
``SeedSequence(seed).spawn(...)[i]``, so it is the same whatever ``n_series`` is.
"""
from __future__ import annotations

import numpy as np

__all__ = ["generate", "SEASONAL_PERIODS"]

#: Periods the seasonal components pick from: hourly day/week, 15-min day, daily week, monthly
#: year, weekly year, plus a few irregular ones.
SEASONAL_PERIODS = (24, 168, 96, 7, 12, 52, 30, 48, 60, 365)


def _rbf_rff(rng: np.random.Generator, t: np.ndarray, lengthscale: float, n_feat: int = 48) -> np.ndarray:
    """Unit-variance RBF-kernel GP sample via random Fourier features on a coarse grid."""
    length = t.shape[0]
    step = max(1.0, lengthscale / 8.0)
    n_grid = int(np.ceil((length - 1) / step)) + 1
    grid = np.linspace(0.0, float(length - 1), max(n_grid, 2))
    omega = rng.standard_normal(n_feat) / lengthscale
    phase = rng.uniform(0.0, 2.0 * np.pi, n_feat)
    w = rng.standard_normal(n_feat)
    f = np.sqrt(2.0 / n_feat) * (np.cos(np.outer(grid, omega) + phase) @ w)
    return np.interp(t, grid, f)


def _periodic_gp(rng: np.random.Generator, t: np.ndarray, period: float, ell: float, n_harm: int = 8) -> np.ndarray:
    """Periodic-kernel GP sample as a Fourier series (coefficient variance decays with harmonic k)."""
    k = np.arange(1, n_harm + 1)
    var = np.exp(-0.5 * (k * ell) ** 2)
    var /= var.sum()
    a = rng.standard_normal(n_harm) * np.sqrt(var)
    b = rng.standard_normal(n_harm) * np.sqrt(var)
    ang = np.outer(t, 2.0 * np.pi * k / period)
    return np.cos(ang) @ a + np.sin(ang) @ b


def _trend(rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    """Trend on normalised time u in [0, 1]."""
    kind = rng.integers(0, 3)
    if kind == 0:  # linear
        return rng.normal(0.0, 1.0) * u
    if kind == 1:  # saturating (logistic)
        centre = rng.uniform(0.2, 0.8)
        width = rng.uniform(0.03, 0.2)
        return rng.normal(0.0, 1.5) / (1.0 + np.exp(-(u - centre) / width))
    # piecewise linear with 1-3 change points
    n_cp = int(rng.integers(1, 4))
    cps = np.sort(rng.uniform(0.1, 0.9, n_cp))
    slopes = rng.normal(0.0, 1.0, n_cp + 1)
    out = slopes[0] * u
    for c, ds in zip(cps, np.diff(slopes)):
        out = out + ds * np.maximum(u - c, 0.0)
    return out


def _seasonal(rng: np.random.Generator, t: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros_like(t)
    n_seas = int(rng.integers(1, 4))
    # prefer periods that repeat at least 4 times in the series
    periods = [p for p in SEASONAL_PERIODS if p * 4 <= length] or [max(2, length // 8)]
    chosen = rng.choice(periods, size=min(n_seas, len(periods)), replace=False)
    for p in chosen:
        n_h = int(rng.integers(1, 4))
        amp = rng.uniform(0.3, 1.5)
        comp = np.zeros_like(t)
        for h in range(1, n_h + 1):
            comp += rng.normal(0.0, 1.0 / h) * np.sin(2.0 * np.pi * h * t / p + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.3:  # slowly drifting amplitude
            comp *= 1.0 + 0.5 * _rbf_rff(rng, t, lengthscale=max(length / 4.0, 8.0), n_feat=16)
        out += amp * comp
    return out


def _level_shifts(rng: np.random.Generator, length: int) -> np.ndarray:
    out = np.zeros(length)
    n = int(rng.poisson(1.0)) if rng.random() < 0.5 else 0
    for _ in range(n):
        at = int(rng.integers(1, max(2, length)))
        out[at:] += rng.normal(0.0, 1.0)
    return out


def _noise(rng: np.random.Generator, length: int) -> np.ndarray:
    scale = rng.uniform(0.02, 0.4)
    if rng.random() < 0.25:
        e = rng.standard_t(df=4, size=length) / np.sqrt(2.0)  # t(4) has variance 2
    else:
        e = rng.standard_normal(length)
    if rng.random() < 0.5:  # AR(1) colouring, kept at unit variance
        e = _ar1(e, rng.uniform(0.3, 0.9))
    return scale * e


def _ar1(e: np.ndarray, phi: float, block: int = 64) -> np.ndarray:
    """x[t] = phi * x[t-1] + sqrt(1 - phi^2) * e[t] (x[-1] = 0), blockwise: one small matmul per
    block of ``block`` steps plus a carry, instead of a Python loop over every step."""
    n = e.shape[0]
    nb = -(-n // block)
    buf = np.zeros(nb * block)
    buf[:n] = e * np.sqrt(1.0 - phi * phi)
    j = np.arange(block)
    lag = j[:, None] - j[None, :]
    tri = np.where(lag >= 0, phi ** np.maximum(lag, 0), 0.0)  # tri[j, i] = phi^(j-i), i <= j
    y = buf.reshape(nb, block) @ tri.T  # each block started from zero
    decay = phi ** (j + 1)
    carry = 0.0
    for b in range(nb):
        y[b] += carry * decay
        carry = y[b, -1]
    return y.reshape(-1)[:n]


def _one_series(rng: np.random.Generator, length: int) -> np.ndarray:
    t = np.arange(length, dtype=np.float64)
    u = t / max(length - 1, 1)
    # GP with a sum of kernels: RBF + periodic + linear
    x = rng.uniform(0.2, 1.0) * _rbf_rff(rng, t, lengthscale=float(np.exp(rng.uniform(np.log(10), np.log(max(20, length / 2))))))
    if rng.random() < 0.7:
        period = float(rng.choice([p for p in SEASONAL_PERIODS if p * 4 <= length] or [max(2, length // 8)]))
        x += rng.uniform(0.2, 1.0) * _periodic_gp(rng, t, period, ell=rng.uniform(0.2, 1.0))
    x += rng.normal(0.0, 0.5) * u + rng.normal(0.0, 0.5)  # linear kernel
    if rng.random() < 0.8:
        x += _trend(rng, u)
    if rng.random() < 0.85:
        x += _seasonal(rng, t, length)
    x += _level_shifts(rng, length)
    x += _noise(rng, length)
    offset = rng.normal(0.0, 5.0)
    scale = float(np.exp(rng.uniform(np.log(0.1), np.log(10.0))))
    return offset + scale * x


def generate(n_series: int, length: int, seed: int = 0) -> np.ndarray:
    """``n_series`` synthetic series of ``length`` steps, float32 ``[n_series, length]``.

    Deterministic for ``seed``; series ``i`` does not depend on ``n_series``.
    """
    if n_series < 0 or length < 1:
        raise ValueError(f"need n_series >= 0 and length >= 1, got {n_series}, {length}")
    children = np.random.SeedSequence(seed).spawn(n_series)
    out = np.empty((n_series, length), dtype=np.float32)
    for i, ss in enumerate(children):
        out[i] = _one_series(np.random.default_rng(ss), length)
    return out
