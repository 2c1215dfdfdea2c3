"""Data layer: file lookup, CSV checks, standard splits, scaling, windows, metrics, synthetic data."""
from __future__ import annotations

import io
import os
import pathlib

import numpy as np
import pytest
import torch

from tsprune import data as D
from tsprune.data import (
    MetricAccumulator,
    StandardScaler,
    WindowDataset,
    load_csv,
    mae,
    make_task,
    mse,
    resolve_csv,
    split_borders,
    task_from_array,
)
from tsprune.synthetic import generate, synthetic_task

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the user's cache or the network by accident."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("TSPRUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("TSPRUNE_NO_DOWNLOAD", "1")


def _shared_csv(name: str) -> pathlib.Path:
    for d in (os.environ.get("TSPRUNE_DATA_DIR"), REPO.parent / "shared" / "data"):
        if d and (pathlib.Path(d) / f"{name}.csv").is_file():
            return pathlib.Path(d) / f"{name}.csv"
    pytest.skip(f"{name}.csv not available (../shared/data absent); real-data test skipped")


def _write_csv(path: pathlib.Path, rows: list[list], header=("date", "a", "b")) -> pathlib.Path:
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _numeric_csv(path: pathlib.Path, n: int, n_vars: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vals = rng.normal(size=(n, n_vars)) * np.arange(1, n_vars + 1) + np.arange(n_vars) * 10
    dates = np.datetime64("2020-01-01T00:00") + np.arange(n).astype("timedelta64[h]")
    with path.open("w") as fh:
        fh.write("date," + ",".join(f"v{i}" for i in range(n_vars)) + "\n")
        for d, r in zip(dates, vals):
            fh.write(str(d).replace("T", " ") + "," + ",".join(repr(float(x)) for x in r) + "\n")
    return vals


# ---------------------------------------------------------------------------------------- splits
def test_etth_borders_standard():
    assert split_borders("ETTh1", 17420, 512) == ((0, 8640), (8128, 11520), (11008, 14400))
    assert split_borders("ETTh2.csv", 17420, 96) == ((0, 8640), (8544, 11520), (11424, 14400))
    assert split_borders("/x/y/ETTh1.csv", 14400, 2048) == ((0, 8640), (6592, 11520), (9472, 14400))


def test_ettm_borders_times_four():
    assert split_borders("ETTm1", 69680, 512) == ((0, 34560), (34048, 46080), (45568, 57600))


def test_ratio_borders_70_10_20():
    n, L = 7588, 96
    tr, te = int(0.7 * n), int(0.2 * n)
    va = n - tr - te
    assert split_borders("exchange_rate", n, L) == ((0, tr), (tr - L, tr + va), (n - te - L, n))
    assert split_borders("national_illness", 966, 36) == ((0, 676), (640, 773), (737, 966))


def test_too_short_errors():
    with pytest.raises(ValueError, match="ETT split needs 14400"):
        split_borders("ETTh1", 10000, 96)
    with pytest.raises(ValueError, match="too short"):
        split_borders("weather", 100, 96)  # train 70 rows < lookback borrowed by val
    with pytest.raises(ValueError, match=r"val segment has 712 rows .* needs >= 1232"):
        split_borders("x", 2000, 512, horizon=720)  # val = 200 + 512 rows
    with pytest.raises(ValueError, match="lookback"):
        make_task("synthetic", 2048, 720)  # default synthetic length 4000 is too short


def test_too_short_message_is_exact_about_split():
    # n=1000: train 700, test 200, val 100; val segment = 100 + L rows
    split_borders("w", 1000, 96, horizon=100)  # val 196 >= 196, fine
    with pytest.raises(ValueError, match=r"val segment has 196 rows"):
        split_borders("w", 1000, 96, horizon=101)


# ----------------------------------------------------------------------------------- real ETTh1
def test_etth1_task_borders_windows_scaler_contents():
    path = _shared_csv("ETTh1")
    L, H = 336, 96
    task = make_task(path, L, H)
    raw, cols = load_csv(path)
    assert cols == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert raw.shape == (17420, 7) and raw.dtype == np.float32
    assert task.borders == ((0, 8640), (8640 - L, 11520), (11520 - L, 14400))

    # window counts: (segment rows - L - H + 1) per variable, stride 1
    assert len(task.train) == 7 * (8640 - L - H + 1)
    assert len(task.val) == 7 * (2880 - H + 1)
    assert len(task.test) == 7 * (2880 - H + 1)
    assert task.test.n_available == len(task.test)

    # scaler: fitted on the first 8640 rows only (independent numpy computation)
    train = raw[:8640].astype(np.float64)
    np.testing.assert_allclose(task.scaler.mean, train.mean(0), rtol=1e-12)
    np.testing.assert_allclose(task.scaler.std, train.std(0), rtol=1e-12)
    assert not np.allclose(task.scaler.mean, raw[:14400].astype(np.float64).mean(0))
    scaled = ((raw.astype(np.float64) - train.mean(0)) / train.std(0)).astype(np.float32)

    # window contents are the raw scaled slices (variable-major order)
    n_test = 2880 - H + 1
    for var, w in [(0, 0), (3, 17), (6, n_test - 1)]:
        ctx, tgt = task.test[var * n_test + w]
        s = 11520 - L + w
        np.testing.assert_array_equal(ctx.numpy(), scaled[s : s + L, var])
        np.testing.assert_array_equal(tgt.numpy(), scaled[s + L : s + L + H, var])
    # first test target starts exactly at the test border, last one ends at row 14400
    _, tgt0 = task.test[0]
    np.testing.assert_array_equal(tgt0.numpy(), scaled[11520 : 11520 + H, 0])
    _, tgt_last = task.test[len(task.test) - 1]
    np.testing.assert_array_equal(tgt_last.numpy(), scaled[14400 - H : 14400, 6])
    ctx_v, _ = task.val[0]
    np.testing.assert_array_equal(ctx_v.numpy(), scaled[8640 - L : 8640, 0])

    # batch gather agrees with item access
    idx = np.array([0, 5, 1000, len(task.train) - 1])
    cb, tb = task.train.batch(idx)
    for k, i in enumerate(idx):
        c, t = task.train[int(i)]
        assert torch.equal(cb[k], c) and torch.equal(tb[k], t)


def test_etth1_by_name_and_subsampling():
    path = _shared_csv("ETTh1")
    task = make_task("ETTh1", 512, 96, data_dir=path.parent, max_train_windows=1000,
                     max_eval_windows=300, eval_stride=1)
    assert task.name == "ETTh1"
    assert len(task.train) == 1000 and task.train.n_available == 7 * (8640 - 512 - 96 + 1)
    assert len(task.test) == 300 and task.test.n_available == 7 * 2785
    var, _ = task.test.locate(np.arange(300))
    assert set(var.tolist()) == set(range(7))  # evenly spread over the variables
    again = make_task("ETTh1", 512, 96, data_dir=path.parent, max_train_windows=1000)
    assert np.array_equal(again.train.indices, task.train.indices)


# ------------------------------------------------------------------------------- scaler / windows
def test_scaler_fitted_on_train_only(tmp_path):
    vals = _numeric_csv(tmp_path / "toy.csv", 1000)
    task_a = make_task(tmp_path / "toy.csv", 24, 12)
    # changing everything after the train border must not change the scaler
    vals2 = vals.copy()
    vals2[700:] += 1000.0
    task_b = task_from_array("toy", vals2.astype(np.float32), None, 24, 12)
    np.testing.assert_allclose(task_a.scaler.mean, task_b.scaler.mean, rtol=1e-6)
    np.testing.assert_allclose(task_a.scaler.std, task_b.scaler.std, rtol=1e-6)
    tr = vals.astype(np.float32).astype(np.float64)[:700]
    np.testing.assert_allclose(task_a.scaler.mean, tr.mean(0), rtol=1e-12)
    np.testing.assert_allclose(task_a.scaler.std, tr.std(0), rtol=1e-12)


def test_scaler_constant_column_and_inverse():
    x = np.stack([np.arange(10.0), np.full(10, 3.0)], axis=1)
    sc = StandardScaler().fit(x)
    assert sc.std[1] == 1.0
    z = sc.transform(x)
    assert z.dtype == np.float32 and np.all(z[:, 1] == 0)
    np.testing.assert_allclose(sc.inverse_transform(z), x, atol=1e-5)
    np.testing.assert_allclose(sc.inverse_transform(z[:, 0], var=0), x[:, 0], atol=1e-5)
    np.testing.assert_allclose(sc.inverse_transform(z.T, var=np.array([0, 1])), x.T, atol=1e-5)
    sc2 = StandardScaler.from_state_dict(sc.state_dict())
    np.testing.assert_array_equal(sc2.transform(x), z)
    with pytest.raises(RuntimeError):
        StandardScaler().transform(x)


def test_window_dataset_stride_order_and_subsample():
    data = np.arange(2 * 30, dtype=np.float32).reshape(2, 30).T  # [30 rows, 2 vars]
    ds = WindowDataset(data, lookback=5, horizon=3, stride=4)
    assert ds.n_per_var == (30 - 8) // 4 + 1 == 6
    assert len(ds) == ds.n_available == 12
    c, t = ds[0]
    assert c.dtype == torch.float32 and c.shape == (5,) and t.shape == (3,)
    assert c.tolist() == [0, 1, 2, 3, 4] and t.tolist() == [5, 6, 7]
    c, t = ds[7]  # var 1, window 1 -> rows 4..12 of column 1 (values 30 + row)
    assert c.tolist() == [34, 35, 36, 37, 38] and t.tolist() == [39, 40, 41]
    c, _ = ds[-1]
    assert c.tolist() == [50, 51, 52, 53, 54]
    with pytest.raises(IndexError):
        ds[12]

    sub = WindowDataset(data, 5, 3, stride=1, max_windows=7)
    assert sub.n_available == 2 * 23 and len(sub) == 7 and sub.subsampled
    assert sub.indices.tolist() == [i * 46 // 7 for i in range(7)]
    assert np.all(np.diff(sub.indices) > 0)
    full = WindowDataset(data, 5, 3)
    for i, g in enumerate(sub.indices):
        assert torch.equal(sub[i][0], full[int(g)][0])
    big = WindowDataset(data, 5, 3, max_windows=10_000)
    assert len(big) == big.n_available and not big.subsampled

    batches = list(full.iter_batches(10))
    assert sum(b[0].shape[0] for b in batches) == len(full)
    assert torch.equal(batches[0][0], full.batch(np.arange(10))[0])

    with pytest.raises(ValueError, match="fewer than lookback"):
        WindowDataset(data[:7], 5, 3)


# --------------------------------------------------------------------------------------- metrics
def test_metrics_match_numpy_float64():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(37, 96)).astype(np.float32)
    t = rng.normal(size=(37, 96)).astype(np.float32)
    d = p.astype(np.float64) - t.astype(np.float64)
    ref_mse, ref_mae = float(np.mean(d * d)), float(np.mean(np.abs(d)))
    assert mse(p, t) == pytest.approx(ref_mse, rel=1e-13)
    assert mae(p, t) == pytest.approx(ref_mae, rel=1e-13)
    assert mse(torch.from_numpy(p), torch.from_numpy(t)) == pytest.approx(ref_mse, rel=1e-13)
    assert mae(torch.from_numpy(p), t) == pytest.approx(ref_mae, rel=1e-13)

    acc = MetricAccumulator()
    for a in range(0, 37, 5):
        acc.update(torch.from_numpy(p[a : a + 5]), torch.from_numpy(t[a : a + 5]))
    r = acc.result()
    assert r["n"] == 37 * 96
    assert r["mse"] == pytest.approx(ref_mse, rel=1e-12)
    assert r["mae"] == pytest.approx(ref_mae, rel=1e-12)
    assert np.isnan(MetricAccumulator().result()["mse"])
    with pytest.raises(ValueError, match="shape"):
        mse(p, t[:, :10])


# ----------------------------------------------------------------------------------- file lookup
def test_missing_file_lists_searched_places(tmp_path, monkeypatch):
    a, b = tmp_path / "given", tmp_path / "env"
    a.mkdir(), b.mkdir()
    monkeypatch.setenv("TSPRUNE_DATA_DIR", str(b))
    with pytest.raises(FileNotFoundError) as ei:
        resolve_csv("no_such_set_xyz", data_dir=a)
    msg = str(ei.value)
    for place in (a, b, REPO.parent / "shared" / "data", D.cache_dir()):
        assert str(place / "no_such_set_xyz.csv") in msg
    assert "TSPRUNE_DATA_DIR" in msg
    assert str(tmp_path / "xdg-cache") in msg


def test_lookup_order_and_case(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _numeric_csv(b / "MySet.csv", 50)
    monkeypatch.setenv("TSPRUNE_DATA_DIR", str(b))
    assert resolve_csv("MySet") == b / "MySet.csv"
    assert resolve_csv("myset.csv") == b / "MySet.csv"
    _numeric_csv(a / "MySet.csv", 50)
    assert resolve_csv("MySet", data_dir=a) == a / "MySet.csv"  # data_dir comes first
    assert resolve_csv(b / "MySet.csv", data_dir=a) == b / "MySet.csv"  # existing path as is


def test_download_failure_and_atomic_success(tmp_path, monkeypatch):
    monkeypatch.delenv("TSPRUNE_NO_DOWNLOAD")
    calls = []

    def boom(url, timeout):
        calls.append((url, timeout))
        raise OSError("offline")

    monkeypatch.setattr(D.urllib.request, "urlopen", boom)
    with pytest.raises(FileNotFoundError, match=r"(?s)ETTm2\.csv.*download from https://.*ETTm2\.csv failed"):
        resolve_csv("ETTm2", data_dir=tmp_path)
    assert calls == [(D.KNOWN_URLS["ETTm2"], 20.0)]

    good = _numeric_csv(tmp_path / "src.csv", 40)
    body = (tmp_path / "src.csv").read_bytes()
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(body))
    got = resolve_csv("ETTm2", data_dir=tmp_path)
    assert got == D.cache_dir() / "ETTm2.csv" and got.read_bytes() == body
    assert [p.name for p in D.cache_dir().iterdir()] == ["ETTm2.csv"]  # no temp file left
    np.testing.assert_allclose(load_csv(got)[0], good.astype(np.float32))
    assert resolve_csv("ETTm2") == got  # second time from the cache

    # an error page is not cached
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"<html>404</html>\n"))
    with pytest.raises(FileNotFoundError):
        resolve_csv("ETTm1", data_dir=tmp_path)
    assert sorted(p.name for p in D.cache_dir().iterdir()) == ["ETTm2.csv"]


# ------------------------------------------------------------------------------------ CSV checks
def test_csv_non_numeric_cell(tmp_path):
    p = _write_csv(tmp_path / "bad.csv", [["2020-01-01", 1.0, 2.0], ["2020-01-02", 1.5, "oops"],
                                           ["2020-01-03", 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"column 'b' has a non-numeric value 'oops' at data row 1"):
        load_csv(p)


def test_csv_nan(tmp_path):
    p = _write_csv(tmp_path / "nan.csv", [["2020-01-01", 1.0, 2.0], ["2020-01-02", 1.5, 2.5],
                                           ["2020-01-03", "", 3.0], ["2020-01-04", "NaN", 3.0]])
    with pytest.raises(ValueError, match=r"column 'a' has a missing value \(NaN\) at data row 2"):
        load_csv(p)


def test_csv_no_numeric_columns_and_too_few_rows(tmp_path):
    p = _write_csv(tmp_path / "d.csv", [["2020-01-01"], ["2020-01-02"]], header=("date",))
    with pytest.raises(ValueError, match="no numeric columns"):
        load_csv(p)
    p = _write_csv(tmp_path / "short.csv", [["2020-01-01", 1, 2]] * 5)
    with pytest.raises(ValueError, match="5 data rows, at least 20 needed"):
        load_csv(p, min_rows=20)
    with pytest.raises(ValueError, match="rows"):
        make_task(p, 24, 12)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_csv(tmp_path / "empty.csv")


def test_csv_ok_layout(tmp_path):
    vals = _numeric_csv(tmp_path / "ok.csv", 30, n_vars=2)
    x, cols = load_csv(tmp_path / "ok.csv")
    assert cols == ["v0", "v1"] and x.dtype == np.float32
    np.testing.assert_allclose(x, vals.astype(np.float32))


# -------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic():
    a = generate(6, 1500, seed=3)
    assert a.shape == (6, 1500) and a.dtype == np.float32
    assert np.array_equal(a, generate(6, 1500, seed=3))
    assert not np.allclose(a, generate(6, 1500, seed=4))
    assert np.array_equal(a[:2], generate(2, 1500, seed=3))  # series i independent of n_series


def test_synthetic_statistics():
    x = generate(64, 2000, seed=0).astype(np.float64)
    assert np.all(np.isfinite(x))
    std = x.std(axis=1)
    assert np.all(std > 1e-3) and np.all(np.abs(x).max(axis=1) < 1e4)
    # the series differ from each other and are not white noise (lag-1 autocorrelation high)
    z = (x - x.mean(1, keepdims=True)) / std[:, None]
    ac1 = np.mean(z[:, 1:] * z[:, :-1], axis=1)
    assert np.median(ac1) > 0.5
    assert np.corrcoef(z)[np.triu_indices(64, 1)].__abs__().mean() < 0.6


def test_synthetic_task_split_and_scaler():
    task = synthetic_task(96, 24, seed=1, n_vars=3, length=2000)
    assert task.borders == ((0, 1400), (1400 - 96, 1600), (1600 - 96, 2000))
    assert task.columns == ["syn_0", "syn_1", "syn_2"]
    raw = generate(3, 2000, seed=1).T.astype(np.float64)
    np.testing.assert_allclose(task.scaler.mean, raw[:1400].mean(0), rtol=1e-10)
    np.testing.assert_allclose(task.scaler.std, raw[:1400].std(0), rtol=1e-10)
    assert len(task.test) == 3 * (400 - 24 + 1)
    ctx, tgt = task.train[0]
    sc = task.scaler.transform(raw)
    np.testing.assert_allclose(ctx.numpy(), sc[:96, 0], rtol=1e-6, atol=1e-6)
    same = make_task("synthetic:1", 96, 24)  # bundled offline task through make_task
    assert same.name == "synthetic-1" and len(same.test) > 0
