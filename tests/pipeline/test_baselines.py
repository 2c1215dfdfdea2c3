"""Baselines: seasonal naive against a hand computation, the linear (NLinear ridge) map against
numpy least squares in float64, ridge strength chosen on validation, frequency -> period."""
import numpy as np
import pytest

from tsprune.baselines import (LinearBaseline, fit_linear, run_baselines, seasonal_naive,
                               seasonal_period)
from tsprune.data import WindowDataset, infer_frequency, task_from_array


def test_seasonal_naive_hand_computation():
    ctx = np.arange(1.0, 11.0)[None, :]  # 1..10
    # period 4: the last season is 7 8 9 10, repeated
    assert seasonal_naive(ctx, 6, 4).tolist() == [[7, 8, 9, 10, 7, 8]]
    assert seasonal_naive(ctx, 3, 4).tolist() == [[7, 8, 9]]
    assert seasonal_naive(ctx, 3, None).tolist() == [[10, 10, 10]]  # unknown frequency
    assert seasonal_naive(ctx, 2, 24).tolist() == [[10, 10]]  # period longer than the lookback
    two = np.array([[0.0, 1, 2, 3], [5, 6, 7, 8]])
    assert seasonal_naive(two, 5, 2).tolist() == [[2, 3, 2, 3, 2], [7, 8, 7, 8, 7]]


def test_seasonal_period_from_frequency():
    assert seasonal_period("hourly") == 24
    assert seasonal_period("daily") == 7
    assert seasonal_period("weekly") == 52
    assert seasonal_period(None) is None and seasonal_period("yearly") is None


@pytest.mark.parametrize("freq,step", [("hourly", "h"), ("daily", "D"), ("weekly", "7D"), ("15min", "15min")])
def test_infer_frequency(tmp_path, freq, step):
    import pandas as pd

    f = tmp_path / "x.csv"
    pd.DataFrame({"date": pd.date_range("2020-01-01", periods=50, freq=step), "a": np.arange(50.0)}).to_csv(f, index=False)
    assert infer_frequency(f) == freq
    g = tmp_path / "y.csv"
    pd.DataFrame({"a": np.arange(50.0), "b": np.arange(50.0)}).to_csv(g, index=False)
    assert infer_frequency(g) is None


def _ar_series(n, rng, noise=0.1):
    """A shift-invariant linear rule: x[t] = 1.5 x[t-1] - 0.5 x[t-2] + e (so y - x_L = -0.5 x'_{L-1})."""
    x = np.zeros(n)
    for t in range(2, n):
        x[t] = 1.5 * x[t - 1] - 0.5 * x[t - 2] + noise * rng.standard_normal()
    return x


def _design(ds):
    c, t = ds.batch_numpy(np.arange(len(ds)))
    c, t = c.astype(np.float64), t.astype(np.float64)
    last = c[:, -1:]
    return c - last, t - last, c, t


def test_linear_matches_numpy_least_squares():
    rng = np.random.default_rng(0)
    series = np.stack([_ar_series(900, rng), _ar_series(900, rng)], axis=1)  # 2 channels
    L, H = 8, 3
    ds = WindowDataset(series, L, H)
    lin = fit_linear(ds, None, alphas=[0.0])
    X, Y, _, _ = _design(ds)
    A = np.concatenate([X[:, :-1], np.ones((len(X), 1))], axis=1)  # x'_L is always 0: left out
    sol, *_ = np.linalg.lstsq(A, Y, rcond=None)
    # normal equations square the condition number of this near-integrated series: ~1e-8 agreement
    np.testing.assert_allclose(lin.W[:-1], sol[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(lin.W[-1], 0.0, atol=1e-9)
    np.testing.assert_allclose(lin.b, sol[-1], rtol=1e-6, atol=1e-8)
    # the known rule comes back (one step ahead): W[L-2, 0] = -0.5, the rest ~0
    assert lin.W[L - 2, 0] == pytest.approx(-0.5, abs=0.05)
    assert np.abs(np.delete(lin.W[:, 0], L - 2)).max() < 0.1
    # predict = x_L + x' W + b
    c, t = ds.batch_numpy(np.arange(10))
    c = c.astype(np.float64)
    np.testing.assert_allclose(lin.predict(c), c[:, -1:] + (c - c[:, -1:]) @ lin.W + lin.b, rtol=1e-12)
    assert lin.params == L * H + H


def test_ridge_matches_closed_form_and_alpha_is_chosen_on_validation():
    rng = np.random.default_rng(1)
    L, H = 6, 2
    tr = WindowDataset(_ar_series(300, rng, noise=1.0)[:, None], L, H)
    va = WindowDataset(_ar_series(300, rng, noise=1.0)[:, None], L, H)
    X, Y, _, _ = _design(tr)
    alphas = [0.0, 0.1, 10.0, 1000.0]
    lin = fit_linear(tr, va, alphas=alphas)
    # validation MSE of each alpha, recomputed directly from a numpy ridge fit with intercept
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    lam_unit = np.trace(Xc.T @ Xc) / L
    Xv, Yv, cv, tv = _design(va)
    direct = {}
    for a in alphas:
        W = np.linalg.pinv(Xc.T @ Xc + a * lam_unit * np.eye(L)) @ Xc.T @ Yc
        b = Y.mean(0) - X.mean(0) @ W
        direct[a] = float(np.mean((cv[:, -1:] + Xv @ W + b - tv) ** 2))
        if a == lin.alpha:
            np.testing.assert_allclose(lin.W, W, rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(lin.b, b, rtol=1e-6, atol=1e-9)
    for a in alphas:
        assert lin.val_mse[a] == pytest.approx(direct[a], rel=1e-9)
    assert lin.alpha == min(direct, key=direct.get)
    # a huge ridge predicts (nearly) the mean offset: clearly worse on validation than the best
    assert direct[1000.0] > direct[lin.alpha]


def test_run_baselines_uses_exactly_the_test_windows():
    rng = np.random.default_rng(2)
    t = np.arange(1200)
    vals = np.stack([np.sin(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(1200),
                     np.cos(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(1200)], axis=1)
    task = task_from_array("toy", vals, None, 48, 12, max_eval_windows=50, freq="hourly")
    res = run_baselines(task)
    sn, ln = res["seasonal_naive"], res["linear"]
    assert sn["test_windows"] == 50 and sn["test_windows_available"] == task.test.n_available
    assert sn["period"] == 24 and sn["params"] == 0 and ln["params"] == 48 * 12 + 12
    c, y = task.test.batch_numpy(np.arange(50))
    ref = seasonal_naive(c, 12, 24)
    assert sn["mse"] == pytest.approx(float(np.mean((ref - y.astype(np.float64)) ** 2)), rel=1e-12)
    assert sn["mae"] == pytest.approx(float(np.mean(np.abs(ref - y.astype(np.float64)))), rel=1e-12)
    # on a clean 24-step season both baselines are near the noise floor
    assert sn["mse"] < 0.1 and ln["mse"] < 0.1
    assert isinstance(LinearBaseline, type)


def test_fit_linear_rejects_bad_alphas():
    ds = WindowDataset(np.arange(50.0)[:, None], 5, 2)
    with pytest.raises(ValueError, match="alphas"):
        fit_linear(ds, None, alphas=[-1.0])
