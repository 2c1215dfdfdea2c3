"""The pre-training corpus (tsprune.corpus) and the resumable pre-training loop (tsprune.pretrain)."""
import numpy as np
import pytest
import torch

from tsprune import corpus as C


def test_kernel_synth_is_an_exact_gp_sample():
    # Force one periodic kernel: the sample covariance over many draws approaches K itself.
    class OnePeriodic:
        def __init__(self, seed):
            self.r = np.random.default_rng(seed)

        def __getattr__(self, name):
            return getattr(self.r, name)

        def integers(self, lo, hi=None, size=None):
            return 1 if (lo, hi) == (1, 6) else self.r.integers(lo, hi, size)

        def choice(self, a, p=None, size=None, replace=True):
            if isinstance(a, int) and a == 6:
                return 2  # RBF
            return self.r.choice(a, p=p, size=size, replace=replace)

        def uniform(self, lo=0.0, hi=1.0, size=None):
            return np.log(10.0) if (lo, hi) == (np.log(2.0), np.log(24.0)) else self.r.uniform(lo, hi, size)

    L, n = 24, 4000
    xs = np.stack([C.kernel_synth(OnePeriodic(i), L, max_kernels=1) for i in range(n)]).astype(np.float64)
    d = np.abs(np.arange(L)[:, None] - np.arange(L)[None, :])
    k = np.exp(-0.5 * (d / 10.0) ** 2)
    emp = xs.T @ xs / n
    assert np.abs(emp - k).max() < 0.12  # sampling error of a 4000-draw covariance, entries <= 1


def test_generators_are_finite_deterministic_and_sized():
    for gen in (C.kernel_synth, C.procedural):
        a = [gen(np.random.default_rng(s), 200) for s in range(20)]
        b = [gen(np.random.default_rng(s), 200) for s in range(20)]
        for x, y in zip(a, b):
            assert x.shape == (200,) and x.dtype == np.float32 and np.isfinite(x).all()
            np.testing.assert_array_equal(x, y)
        assert np.std([x.std() for x in a]) > 0  # not all the same series


def test_real_mix_uses_only_train_rows(tmp_path):
    rows = 1000
    vals = np.arange(rows, dtype=np.float64)[:, None] * np.array([[1.0, -1.0]]) + 5000.0
    import pandas as pd

    df = pd.DataFrame({"date": pd.date_range("2020", periods=rows, freq="h"), "a": vals[:, 0], "b": vals[:, 1]})
    df.to_csv(tmp_path / "toy.csv", index=False)
    import os

    old = os.environ.get("TSPRUNE_DATA_DIR")
    os.environ["TSPRUNE_DATA_DIR"] = str(tmp_path)
    try:
        series, desc = C.real_train_series(["toy", "no_such_file"])
    finally:
        os.environ.pop("TSPRUNE_DATA_DIR") if old is None else os.environ.__setitem__("TSPRUNE_DATA_DIR", old)
    assert len(series) == 2 and len(desc) == 1
    np.testing.assert_allclose(series[0], vals[:700, 0])  # 70% train split, nothing after it
    assert "rows [0, 700)" in desc[0]


def test_etth1_is_refused():
    with pytest.raises(ValueError, match="ETTh1"):
        C.real_train_series(["ETTh2", "ETTh1"])


def test_corpus_mixture_and_short_contexts():
    rng = np.random.default_rng(0)
    real = [np.sin(np.arange(3000) / 7.0).astype(np.float32) + 2.0]
    c = C.Corpus(120, 100, rng, real, pool_size=8, refresh=2, short_ctx=0.5)
    w = c.sample(200)
    assert w.shape == (200, 120) and w.dtype == np.float32
    assert np.isfinite(w[:, 100:]).all()  # targets are never missing
    nan_rows = np.isnan(w[:, :100]).any(1)
    assert 0.3 < nan_rows.mean() < 0.7
    for row in w[nan_rows]:  # missing values only as a left padding of the context
        k = np.isnan(row).sum()
        assert np.isnan(row[:k]).all() and np.isfinite(row[k:]).all() and 100 - k >= 32
    assert (c.counts[:3] > 0).all() and c.counts[3] == 0 and c.counts.sum() == 200
    assert C.Corpus(50, 40, rng, None, pool_size=2).weights[2] == 0.0  # no real data: no real share


def test_pretrain_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from tsprune import pretrain as P

    tiny = dict(d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1, num_decoder_layers=1)
    real_build = P.build_model
    monkeypatch.setattr(P, "build_model", lambda overrides=None, seed=0: real_build(tiny, seed))
    monkeypatch.setattr(P, "REAL_SOURCES", ())
    ck = tmp_path / "c.pt"
    m1, info1 = P.pretrain(ck, steps=3, batch=4, warmup=1, amp=False, pool_size=4)
    assert info1["steps_done"] == 3 and info1["samples_seen"] == 12 and ck.is_file()
    m2, info2 = P.pretrain(ck, steps=5, batch=4, warmup=1, amp=False, pool_size=4)
    assert info2["steps_done"] == 5 and info2["samples_seen"] == 20
    assert sum(info2["source_counts"].values()) == 20
    log = (tmp_path / "c.pt.log.jsonl").read_text()
    assert "resumed from" in log
    # the resumed model started from the first run's weights, not from a fresh init
    assert any(not torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_normalised_peak_matches_chronos_bolt_scaling():
    from tsprune.corpus import normalised_peak

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, 40).astype(np.float32)
    x[:5] = np.nan
    ctx = x[:30][np.isfinite(x[:30])].astype(np.float64)
    want = np.abs(x[30:] - ctx.mean()).max() / ctx.std()
    assert abs(normalised_peak(x, 30) - want) <= 1e-6 * want
    flat = np.full(40, 7.0, np.float32)
    flat[-1] = 8.0  # constant context: scale is Chronos-Bolt's eps 1e-5
    assert abs(normalised_peak(flat, 30) - 1e5) <= 1.0
    assert normalised_peak(np.full(40, np.nan, np.float32), 30) == float("inf")


def test_corpus_never_emits_a_window_beyond_max_peak():
    from tsprune.corpus import Corpus, normalised_peak

    rng = np.random.default_rng(1)
    c = Corpus(96, 64, rng, [], pool_size=8, weights=(0.3, 0.7, 0.0), max_peak=2.0)
    b = c.sample(128)
    assert c.rejected > 0  # at 2 scales many windows are out
    flat = 0
    for r in b:
        if normalised_peak(r, 64) > 2.0 + 1e-6:  # only a replaced window: continued flat at its last value
            last = r[:64][np.isfinite(r[:64])][-1]
            assert (r[64:] == last).all()
            flat += 1
    assert flat <= c.rejected
    assert np.isfinite(b[:, 64:]).all()
    # with the default bound (50) a flat continuation is always inside it: |x_i - mean| <= sqrt(n-1) std
    c50 = Corpus(96, 64, np.random.default_rng(2), [], pool_size=8, weights=(0.3, 0.7, 0.0))
    assert max(normalised_peak(r, 64) for r in c50.sample(256)) <= 50.0


def _tiny_pretrain(monkeypatch):
    from tsprune import pretrain as P

    tiny = dict(d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1, num_decoder_layers=1)
    real_build = P.build_model
    monkeypatch.setattr(P, "build_model", lambda overrides=None, seed=0: real_build(tiny, seed))
    monkeypatch.setattr(P, "REAL_SOURCES", ())
    # the loss monitor's fixed batch (64 GP draws) is not what these tests are about
    g = torch.Generator().manual_seed(0)
    mon = (torch.randn(8, P.DEFAULT_CONTEXT, generator=g), torch.randn(8, P.DEFAULT_HORIZON, generator=g))
    monkeypatch.setattr(P, "_monitor_batch", lambda seed, real, n=256: mon)
    return P


def test_pretrain_with_generator_workers_counts_every_sample_and_resumes(tmp_path, monkeypatch):
    P = _tiny_pretrain(monkeypatch)
    ck = tmp_path / "w.pt"
    _, info1 = P.pretrain(ck, steps=3, batch=4, warmup=1, amp=False, pool_size=4, workers=1)
    assert info1["steps_done"] == 3 and sum(info1["source_counts"].values()) == 12
    _, info2 = P.pretrain(ck, steps=5, batch=4, warmup=1, amp=False, pool_size=4, workers=2)
    assert info2["steps_done"] == 5 and info2["samples_seen"] == 20
    assert sum(info2["source_counts"].values()) == 20  # counts come back from the worker processes
    log = (tmp_path / "w.pt.log.jsonl").read_text()
    assert "workers=1" in log and "workers=2" in log and "resumed from" in log


def test_pretrain_init_starts_from_a_saved_model_and_refuses_a_pruned_one(tmp_path, monkeypatch):
    import tsprune

    P = _tiny_pretrain(monkeypatch)
    ck = tmp_path / "a.pt"
    P.pretrain(ck, steps=2, batch=4, warmup=1, amp=False, pool_size=4)
    P.export(ck, tmp_path / "exp", "float32")
    exported = tsprune.load_pruned(tmp_path / "exp")
    # lr 0: one optimiser step changes nothing, so the new run's weights are the init's exactly
    m, info = P.pretrain(tmp_path / "b.pt", steps=1, batch=4, warmup=1, lr=0.0, amp=False, pool_size=4,
                         init=tmp_path / "exp")
    for (k, a), b in zip(m.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), k
    assert "initialised from" in (tmp_path / "b.pt.log.jsonl").read_text()
    # a pruned model has lost units: pre-training it would not be the model's shape
    pr = tsprune.Pruner(exported, criterion="magnitude", macro_batch_size=10**9)
    with torch.no_grad():
        next(iter(pr.masks.values()))[0] = 0.0
    tsprune.save_pruned(pr.repack(), tmp_path / "pruned")
    with pytest.raises(ValueError, match="pruned model"):
        P.pretrain(tmp_path / "c.pt", steps=1, batch=4, amp=False, pool_size=4, init=tmp_path / "pruned")


def test_pick_device_names_the_option():
    from tsprune import pretrain as P

    assert P.pick_device("cpu").type == "cpu"
    assert P.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device 'nonsense'"):
        P.pick_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            P.pick_device("cuda")


class _FakeBolt(torch.nn.Module):
    """Stands in for Chronos-Bolt in the seasonal probe: ``oracle`` continues the context with the
    longest probe period it repeats exactly (exact for the probe's clean series: a longer period that
    matches is a multiple of the true one, while a flat stretch of the square wave also repeats at
    shorter lags), otherwise the context mean (a flat line)."""

    def __init__(self, oracle: bool):
        super().__init__()
        import types

        from tsprune.pretrain import DEFAULT_HORIZON

        self.w = torch.nn.Parameter(torch.zeros(1))
        self.oracle, self.h = oracle, DEFAULT_HORIZON
        self.chronos_config = types.SimpleNamespace(quantiles=[0.1, 0.5, 0.9])

    def forward(self, context):
        import types

        from tsprune.pretrain import PROBE_PERIODS

        b, L = context.shape
        pred = context.mean(1, keepdim=True).expand(b, self.h).clone()
        if self.oracle:
            for i in range(b):
                x = context[i]
                per = next(p for p in sorted(PROBE_PERIODS, reverse=True) if torch.allclose(x[-p:], x[-2 * p:-p], atol=1e-5))
                pred[i] = x[L - per + torch.arange(self.h) % per]
        return types.SimpleNamespace(quantile_preds=torch.stack([pred - 1, pred, pred + 1], 1))


def test_seasonal_probe_scores_an_exact_continuation_0_and_a_flat_line_about_1():
    from tsprune.pretrain import PROBE_PERIODS, seasonal_probe

    exact, flat = _FakeBolt(True).train(), _FakeBolt(False)
    s = seasonal_probe(exact)
    assert set(s) == {f"p{p}" for p in PROBE_PERIODS} | {"mean"}
    assert all(v < 1e-6 for v in s.values()), s
    assert exact.training  # the caller's mode is restored
    f = seasonal_probe(flat)
    assert all(0.7 < v < 1.4 for v in f.values()), f
    assert seasonal_probe(flat) == f  # deterministic


def test_probe_command_prints_the_default_models_scores(capsys):
    import json

    from tsprune.pretrain import PROBE_PERIODS, main

    main(["--probe", "default"])
    s = json.loads(capsys.readouterr().out)
    assert set(s) == {f"p{p}" for p in PROBE_PERIODS} | {"mean"}
    assert all(0.0 <= v < 10.0 for v in s.values()), s
    with pytest.raises(SystemExit, match="no such model directory"):
        main(["--probe", "/nonexistent/model"])


def test_periodic_series_repeats_at_its_period():
    """A one-component series at an exact period p (no jitter): x[t + p] - x[t] is only the noise
    and trend, far smaller than the waveform itself."""
    rng = np.random.default_rng(3)
    n_checked = 0
    for _ in range(200):
        state = rng.bit_generator.state
        x = C.periodic_series(rng, 600)
        assert x.shape == (600,) and x.dtype == np.float32 and np.isfinite(x).all() and x.std() > 0
        r = np.random.default_rng()  # replay the draws that fix the structure
        r.bit_generator.state = state
        if int(r.integers(1, 4)) != 1:
            continue
        p = float(r.choice(C.PERIODIC_PERIODS))
        if r.random() < 0.2:
            continue
        kind = (r.uniform(0, p), int(r.integers(4)))[1]
        if kind == 1:  # a pulse of random height can be ~0: nothing to repeat
            continue
        p = int(p)
        diff = x[p:].astype(np.float64) - x[:-p]
        # noise <= 0.5 sd per point (diff of two: <= 0.71 sd), trend over one period is small
        assert diff.std() < 0.9 * x.std(), (p, kind, diff.std(), x.std())
        n_checked += 1
    assert n_checked >= 20


def test_corpus_periodic_share():
    real = [np.sin(np.arange(3000) / 7.0).astype(np.float32)]
    off = C.Corpus(120, 100, np.random.default_rng(5), real, pool_size=4)
    zero = C.Corpus(120, 100, np.random.default_rng(5), real, pool_size=4, periodic=0.0)
    np.testing.assert_array_equal(off.sample(64), zero.sample(64))  # share 0: the stream of old
    assert off.counts[3] == 0 and len(off.weights) == 3
    half = C.Corpus(120, 100, np.random.default_rng(6), real, pool_size=4, periodic=0.5)
    half.sample(400)
    assert 150 < half.counts[3] < 250 and half.counts.sum() == 400
    np.testing.assert_allclose(half.weights[:3].sum(), 0.5)
    with pytest.raises(ValueError, match="periodic share"):
        C.Corpus(120, 100, np.random.default_rng(6), real, pool_size=4, periodic=1.0)


def test_pretrain_periodic_share_is_kept_on_resume(tmp_path, monkeypatch):
    P = _tiny_pretrain(monkeypatch)
    ck = tmp_path / "p.pt"
    _, info1 = P.pretrain(ck, steps=3, batch=16, warmup=1, amp=False, pool_size=4, periodic=0.5)
    assert info1["periodic_share"] == 0.5 and info1["source_counts"]["periodic"] > 0
    _, info2 = P.pretrain(ck, steps=5, batch=16, warmup=1, amp=False, pool_size=4)  # the checkpoint's share wins
    assert info2["periodic_share"] == 0.5 and sum(info2["source_counts"].values()) == 80
    assert "periodic share 0.5" in (tmp_path / "p.pt.log.jsonl").read_text()
    with pytest.raises(SystemExit, match="--periodic must be in"):
        P.main(["--ckpt", str(tmp_path / "q.pt"), "--periodic", "1.5"])
