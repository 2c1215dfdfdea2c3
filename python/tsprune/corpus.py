"""The pre-training corpus of the embedded default model: series generated on the fly.

Stage of the flow: **generators -> windows [length]** -> ``tsprune.pretrain`` (never the pruning
pipeline). Three sources (four with ``periodic > 0``), mixed per sample by :class:`Corpus`:

* ``kernel_synth``: Gaussian-process samples whose kernel is a random composition (sum or product)
  of 1-5 kernels drawn from a bank (constant, linear, RBF, rational quadratic, periodic at many
  periods, white noise), sampled exactly through a Cholesky factor of the covariance (the idea of
  KernelSynth, Ansari et al. 2024; this is our own implementation). Cholesky costs O(L^3), so these
  live in a pool that is partly refreshed every step.
* ``procedural``: cheap structured series: trends, one to three seasonalities (additive or
  multiplicative), regime changes between AR processes, level shifts and spikes, intermittent
  (sparse, non-negative) demand, random walks, heteroscedastic noise, and random frequencies (a
  series generated at a fine step and aggregated by a random factor). Built on tsprune.data.synthetic.
* ``real_mix``: TSMixup-style convex mixtures (Dirichlet weights) of 1-3 crops of real series, each
  crop scaled by its mean absolute value, optionally aggregated in time. Only TRAIN splits of the
  files given (see :func:`real_train_series`); the pre-training script passes ETTh2, exchange_rate
  and national_illness and never ETTh1.
* ``periodic`` (off unless asked for): clean repeating waveforms (1-3 components among sines,
  pulses / dips, sawtooths and random smooth harmonic shapes, at common periods slightly jittered
  now and then, light noise and trend). The other sources bury seasonality under GP noise and
  regime changes; a model pre-trained on them alone forecast a flat median for a clean daily dip
  (``tsprune.pretrain.seasonal_probe``; benchmarks/README.md "Pre-training the next default model").

All randomness comes from one ``numpy.random.Generator``; shorter-than-window series are padded on
the left with NaN (Chronos-Bolt treats NaN as missing).
"""
from __future__ import annotations

import math

import numpy as np

from .data.synthetic import SEASONAL_PERIODS, _ar1, _one_series

__all__ = ["kernel_synth", "procedural", "periodic_series", "real_mix", "real_train_series", "Corpus",
           "normalised_peak", "SOURCES"]

#: The sources in the order of :attr:`Corpus.counts`.
SOURCES = ("kernel_synth", "procedural", "real_mix", "periodic")

#: Periods (in steps) of the periodic kernels: hourly day / week, 15-min day, daily week / month /
#: year, monthly year, weekly year, and a few short ones.
KERNEL_PERIODS = (4, 6, 7, 12, 14, 24, 30, 48, 52, 60, 96, 168, 336, 365)


# -- kernel_synth ------------------------------------------------------------------------------------

def _kernel(rng: np.random.Generator, t: np.ndarray, d: np.ndarray, length: int) -> np.ndarray:
    """One random base kernel on time steps t ([L]) with |t_i - t_j| = d ([L, L]); unit scale."""
    kind = rng.choice(6, p=[0.05, 0.1, 0.25, 0.15, 0.4, 0.05])
    if kind == 0:  # constant
        return np.full_like(d, rng.uniform(0.1, 1.0))
    if kind == 1:  # linear (in normalised time, random offset)
        u = t / length - rng.uniform(0.0, 1.0)
        return rng.uniform(0.1, 1.0) * np.outer(u, u)
    ell = float(np.exp(rng.uniform(np.log(2.0), np.log(max(4.0, length)))))
    if kind == 2:  # RBF
        return np.exp(-0.5 * (d / ell) ** 2)
    if kind == 3:  # rational quadratic
        alpha = float(rng.choice([0.1, 1.0, 10.0]))
        return (1.0 + (d / ell) ** 2 / (2.0 * alpha)) ** (-alpha)
    if kind == 4:  # periodic
        p = float(rng.choice([q for q in KERNEL_PERIODS if q * 2 <= length] or [max(2, length // 4)]))
        lp = rng.uniform(0.5, 2.0)
        return np.exp(-2.0 * np.sin(np.pi * d / p) ** 2 / lp**2)
    return np.eye(d.shape[0]) * rng.uniform(0.01, 0.3)  # white noise


def kernel_synth(rng: np.random.Generator, length: int, max_kernels: int = 5) -> np.ndarray:
    """One zero-mean GP sample [length] float32 whose kernel composes 1..max_kernels base kernels
    with random + / * (exact: x = chol(K + jitter) @ z)."""
    t = np.arange(length, dtype=np.float64)
    d = np.abs(t[:, None] - t[None, :])
    n = int(rng.integers(1, max_kernels + 1))
    k = _kernel(rng, t, d, length)
    for _ in range(n - 1):
        k2 = _kernel(rng, t, d, length)
        k = k + k2 if rng.random() < 0.5 else k * k2
    k[np.diag_indices(length)] += 1e-5 * max(1.0, float(np.mean(np.diag(k))))
    try:
        c = np.linalg.cholesky(k)
    except np.linalg.LinAlgError:  # numerically indefinite product: fall back to its spectrum
        w, v = np.linalg.eigh(k)
        c = v * np.sqrt(np.clip(w, 0.0, None))
    return (c @ rng.standard_normal(length)).astype(np.float32)


# -- procedural --------------------------------------------------------------------------------------

def _regimes(rng: np.random.Generator, length: int) -> np.ndarray:
    """Piecewise AR(1) / level / volatility regimes with 1-4 switches."""
    cuts = np.sort(rng.integers(1, length, size=int(rng.integers(1, 5))))
    out = np.empty(length)
    prev = 0
    level = 0.0
    for end in [*cuts, length]:
        n = end - prev
        if n <= 0:
            continue
        level += rng.normal(0.0, 1.0)
        phi = rng.uniform(0.0, 0.98)
        out[prev:end] = level + rng.uniform(0.05, 0.8) * _ar1(rng.standard_normal(n), phi)
        prev = end
    return out


def _intermittent(rng: np.random.Generator, length: int) -> np.ndarray:
    """Sparse non-negative demand: Bernoulli occurrences times positive sizes, maybe seasonal."""
    p = rng.uniform(0.05, 0.6)
    if rng.random() < 0.4:  # occurrence probability with a daily / weekly rhythm
        period = float(rng.choice([7, 24, 168]))
        p = np.clip(p * (1.0 + 0.8 * np.sin(2 * np.pi * np.arange(length) / period + rng.uniform(0, 6.3))), 0, 1)
    occ = rng.random(length) < p
    size = rng.gamma(rng.uniform(0.5, 3.0), rng.uniform(0.5, 5.0), length)
    if rng.random() < 0.5:
        size = np.round(size)
    return occ * size


def _spikes(rng: np.random.Generator, length: int) -> np.ndarray:
    out = np.zeros(length)
    n = int(rng.poisson(2.0))
    out[rng.integers(0, length, n)] = rng.normal(0.0, 4.0, n)
    return out


def procedural(rng: np.random.Generator, length: int) -> np.ndarray:
    """One structured series [length] float32 (see the module docstring)."""
    factor = int(rng.choice([1, 1, 1, 2, 3, 4, 6, 12, 24])) if length * 24 <= 200_000 else 1
    n = length * factor
    kind = rng.random()
    if kind < 0.45:  # trend + seasonalities + shifts + noise (tsprune.data.synthetic)
        x = _one_series(rng, n)
        if rng.random() < 0.3:  # multiplicative seasonality: amplitude follows the level
            t = np.arange(n)
            p = float(rng.choice([q for q in SEASONAL_PERIODS if q * 4 <= n] or [max(2, n // 8)]))
            x = (np.abs(x - x.min()) + 1.0) * (1.0 + 0.5 * np.sin(2 * np.pi * t / p + rng.uniform(0, 6.3)))
    elif kind < 0.65:
        x = _regimes(rng, n)
    elif kind < 0.8:
        x = _intermittent(rng, n)
    elif kind < 0.9:  # random walk with drift, maybe heteroscedastic
        steps = rng.standard_normal(n) * (1.0 + (rng.random() < 0.5) * np.abs(_ar1(rng.standard_normal(n), 0.95)))
        x = np.cumsum(steps + rng.normal(0.0, 0.05))
    else:  # sums of sinusoids at random (non-standard) frequencies
        t = np.arange(n)
        x = sum(rng.normal(0, 1) * np.sin(2 * np.pi * t / rng.uniform(3, max(4, n / 3)) + rng.uniform(0, 6.3))
                for _ in range(int(rng.integers(1, 5))))
        x = x + rng.uniform(0.0, 0.3) * rng.standard_normal(n)
    if rng.random() < 0.2:
        x = x + _spikes(rng, n) * (np.std(x) + 1e-3)
    if factor > 1:  # random frequency: aggregate (sum for counts, mean otherwise)
        x = x[: length * factor].reshape(length, factor)
        x = x.sum(1) if kind >= 0.65 and kind < 0.8 else x.mean(1)
    return np.asarray(x, dtype=np.float32)


# -- periodic ----------------------------------------------------------------------------------------

#: Periods of the periodic source (hourly day / week, 15-min day, daily week / month / year, ...).
PERIODIC_PERIODS = (6, 7, 12, 24, 24, 24, 30, 48, 52, 96, 168, 365)


def periodic_series(rng: np.random.Generator, length: int) -> np.ndarray:
    """A clean repeating series [length] float32: a sum of 1-3 waveforms (sine, pulse / dip of a
    random duty cycle, sawtooth, or a random smooth shape of four harmonics), each at a period of
    :data:`PERIODIC_PERIODS` (one in five scaled by 0.7-1.4: not every season is a round number)
    with a log-normal amplitude, plus a small trend and white noise up to half the signal's std."""
    t = np.arange(length, dtype=np.float64)
    x = np.zeros(length)
    for _ in range(int(rng.integers(1, 4))):
        period = float(rng.choice(PERIODIC_PERIODS))
        if rng.random() < 0.2:
            period *= rng.uniform(0.7, 1.4)
        u = ((t + rng.uniform(0, period)) % period) / period  # phase in [0, 1)
        kind = int(rng.integers(4))
        if kind == 0:
            w = np.sin(2 * np.pi * u)
        elif kind == 1:
            w = np.where(u < rng.uniform(0.05, 0.4), rng.normal(0, 2), 0.0)
        elif kind == 2:
            w = u - 0.5
        else:
            w = sum(rng.normal(0, 1 / k) * np.sin(2 * np.pi * k * u + rng.uniform(0, 2 * np.pi)) for k in range(1, 5))
        x += rng.lognormal(0, 0.7) * w
    sd = float(np.std(x))
    x += rng.normal(0, 0.02) * rng.random() * t * (sd + 1e-3) / max(1.0, length / 50)
    x += rng.uniform(0, 0.5) * sd * rng.standard_normal(length)
    return x.astype(np.float32)


# -- real_mix ----------------------------------------------------------------------------------------

def real_train_series(names, min_len: int = 32) -> tuple[list[np.ndarray], list[str]]:
    """(series, descriptions): every variable of the TRAIN split (tsprune.data.split_borders) of
    each named CSV that can be found offline; names not found are skipped."""
    from .data import load_csv, resolve_csv, split_borders

    out, desc = [], []
    for name in names:
        if name.lower() == "etth1":
            raise ValueError("real_train_series: ETTh1 is the held-out zero-shot data set; never pre-train on it")
        try:
            path = resolve_csv(name, download=False)
        except FileNotFoundError:
            continue
        values, cols = load_csv(path)
        (t0, t1), _, _ = split_borders(path.stem, len(values), lookback=1)
        for v in range(values.shape[1]):
            s = values[t0:t1, v].astype(np.float32)
            if np.isfinite(s).sum() >= min_len:
                out.append(s)
        desc.append(f"{path.name} rows [{t0}, {t1}) (train split), {values.shape[1]} variables")
    return out, desc


def _crop(rng: np.random.Generator, s: np.ndarray, length: int) -> np.ndarray:
    factor = int(rng.choice([1, 1, 1, 2, 4, 24])) if len(s) >= 24 * 64 else int(rng.choice([1, 1, 2]))
    if factor > 1:
        m = len(s) // factor
        s = s[len(s) - m * factor:].reshape(m, factor).mean(1)
    if len(s) <= length:
        return np.concatenate([np.full(length - len(s), np.nan, np.float32), s])
    start = int(rng.integers(0, len(s) - length + 1))
    return s[start : start + length]


def real_mix(rng: np.random.Generator, pool: list[np.ndarray], length: int) -> np.ndarray:
    """A convex mixture of 1-3 scaled crops of ``pool`` series (TSMixup-style), [length] float32."""
    k = int(rng.choice([1, 1, 2, 3]))
    w = rng.dirichlet(np.ones(k))
    out = np.zeros(length, np.float64)
    for wi in w:
        c = _crop(rng, pool[int(rng.integers(len(pool)))], length).astype(np.float64)
        scale = np.nanmean(np.abs(c))
        out += wi * c / (scale if np.isfinite(scale) and scale > 0 else 1.0)
    return out.astype(np.float32)


# -- the mixture -------------------------------------------------------------------------------------

class Corpus:
    """Draws pre-training windows: ``sample(batch)`` -> float32 [batch, length] (NaN = missing).

    weights: probabilities of (kernel_synth, procedural, real_mix); real_mix's share goes to the
    others when no real series is available. ``periodic``: the share of :func:`periodic_series`
    (the others scaled by 1 - periodic); 0 (the default) draws exactly the stream of a corpus
    without that source. ``counts`` [4]: samples drawn per source (:data:`SOURCES`). The kernel_synth pool holds ``pool_size`` series and
    ``refresh`` of them are replaced per call (Cholesky is the expensive part). Also applied per
    sample: a random offset / scale, and with probability ``short_ctx`` a context cut to a random
    length in [32, context] (left-padded with NaN) so short-context tasks are seen in training.
    A window whose target lies more than ``max_peak`` context scales from the context mean (see
    :func:`normalised_peak`) keeps its context and gets a flat continuation instead (counted in
    ``rejected``)."""

    def __init__(self, length: int, context: int, rng: np.random.Generator, real: list[np.ndarray] | None = None,
                 weights=(0.35, 0.4, 0.25), pool_size: int = 2048, refresh: int = 4, short_ctx: float = 0.2,
                 max_peak: float = 50.0, periodic: float = 0.0):
        if not 0.0 <= periodic < 1.0:
            raise ValueError(f"Corpus: periodic share must be in [0, 1), got {periodic}")
        self.length, self.context, self.rng = length, context, rng
        self.real = real or []
        w = np.asarray(weights, np.float64)
        if not self.real:
            w[2] = 0.0
        self.weights = w / w.sum()
        if periodic > 0:  # a fourth source; without it the draw below is the three-way one of old
            self.weights = np.append(self.weights * (1.0 - periodic), periodic)
        self.pool = [kernel_synth(rng, length) for _ in range(pool_size)] if self.weights[0] > 0 else []
        self.refresh, self.short_ctx = refresh, short_ctx
        self.counts = np.zeros(len(SOURCES), np.int64)
        self.max_peak, self.rejected = max_peak, 0

    def sample(self, batch: int) -> np.ndarray:
        rng, L = self.rng, self.length
        for _ in range(self.refresh if self.pool else 0):
            self.pool[int(rng.integers(len(self.pool)))] = kernel_synth(rng, L)
        src = rng.choice(len(self.weights), size=batch, p=self.weights)
        self.counts += np.bincount(src, minlength=len(SOURCES))
        out = np.empty((batch, L), np.float32)
        for i, s in enumerate(src):
            if s == 0:
                x = self.pool[int(rng.integers(len(self.pool)))].copy()
                if rng.random() < 0.5:  # add a trend / level so GP samples are not all zero-mean
                    x += rng.normal(0, 1.0) * np.linspace(0, 1, L, dtype=np.float32) + rng.normal(0, 1.0)
            elif s == 1:
                x = procedural(rng, L)
            elif s == 2:
                x = real_mix(rng, self.real, L)
            else:
                x = periodic_series(rng, L)
            x = x * float(np.exp(rng.uniform(math.log(0.1), math.log(100.0)))) + rng.normal(0, 10.0)
            if rng.random() < self.short_ctx:
                keep = int(rng.integers(32, self.context + 1))
                x[: self.context - keep] = np.nan
            if normalised_peak(x, self.context) > self.max_peak:
                # near-constant context, then movement: the instance-normalised target would be
                # thousands of scales out and one such window dominated whole batches (loss 1e3-1e6)
                self.rejected += 1
                x = self._fallback(x)
            out[i] = x
        return out

    def _fallback(self, x: np.ndarray) -> np.ndarray:
        # keep the window's context and continue it flat: a legitimate (if easy) target
        y = x.copy()
        ctx = y[: self.context]
        last = ctx[np.isfinite(ctx)]
        y[self.context :] = last[-1] if last.size else 0.0
        return y


def normalised_peak(x: np.ndarray, context: int) -> float:
    """max |target - mean(context)| / scale(context), with Chronos-Bolt's instance scaling (std of
    the finite context values, 1e-5 where that std is 0); inf when the context has no values."""
    ctx = x[:context]
    ctx = ctx[np.isfinite(ctx)]
    if ctx.size == 0:
        return math.inf
    loc = float(ctx.mean())
    scale = float(np.sqrt(np.mean((ctx - loc) ** 2)))
    if scale == 0.0:
        scale = 1e-5
    tgt = x[context:]
    tgt = tgt[np.isfinite(tgt)]
    return float(np.abs(tgt - loc).max() / scale) if tgt.size else 0.0
