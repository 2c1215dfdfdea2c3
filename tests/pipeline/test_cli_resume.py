"""`tsprune run --resume`: a run stopped after any stage and continued gives the run that was never
stopped (every number equal, not close: every stage starts from the same seed), re-runs no
finished fine-tune or calibration, and refuses to mix settings; a plain run refuses to overwrite
an unfinished one.

Tiny settings as in test_cli_run.py (synthetic task, lookback 64, horizon 24, 2 fine-tune steps).
"""
import contextlib
import io
import json
import re
import shutil

import pytest

from tsprune import cli
from tsprune.cli import main

FAST = ["--data", "synthetic", "--horizon", "24", "--lookback", "64", "--no-progress",
        "--max-train-windows", "48", "--max-val-windows", "48", "--max-eval-windows", "48", "--batch-size", "16",
        "--calib-epochs", "2", "--ft-max-steps", "2", "--prune-ratio-per-epoch", "0.5", "--val-tolerance", "10",
        "--search", "--grid-lr", "0.001,0.004", "--grid-prune-ratio", "0.3,0.5", "--grid-ptf-lr", "0.002",
        "--grid-ema", "0.5", "--seeds", "2"]


def _run(out, *extra) -> tuple[int, str]:
    e = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(e):
        rc = main(["run", *FAST, "--out", str(out), *extra])
    return rc, e.getvalue()


class Stop(KeyboardInterrupt):  # as a Ctrl-C would: main() does not catch it
    pass


def _numbers(res: dict) -> dict:
    """Everything in results.json that is a result (not a timing, not a path)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in {
                "eval_seconds", "ms_per_window", "seconds", "calibration_seconds", "calibration_windows_per_second",
                "resume", "out", "heatmap", "resumed_stages", "stage_commits", "stage_cpus", "speed", "wall_seconds", "train_seconds",
                "threads", "windows_per_second"} and "seconds" not in k}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(res)


@pytest.fixture(scope="module")
def straight_out(tmp_path_factory, _one_thread):
    out = tmp_path_factory.mktemp("straight") / "run"
    rc, log = _run(out)
    assert rc == 0, log
    assert not (out / "progress").exists()  # a finished run leaves no journal
    return out


@pytest.fixture(scope="module")
def straight(straight_out):
    return json.loads((straight_out / "results.json").read_text())


def _saved_sha(folder):
    from tsprune.checkpoint import load_pruned
    from tsprune.journal import model_sha256

    return model_sha256(load_pruned(folder, dtype=None))


def _stop_at(monkeypatch, obj, name, n):
    """``obj.name`` raises Stop on its call number n + 1 (the first n calls run); returns the real one."""
    real = getattr(obj, name)
    calls = {"n": 0}

    def stopping(*a, **k):
        if calls["n"] == n:
            raise Stop("stopped")
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(obj, name, stopping)
    return real


def _count(monkeypatch, name):
    calls = []
    real = getattr(cli, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cli, name, counted)
    return calls


# The run's fine-tunes, in order: 2 fine-tune grid points, 1 more seed, 2 prune-then-finetune grid
# points (2 calibrations), 1 more seed: 6 fine-tunes and 3 calibrations. Stop in each part.
@pytest.mark.parametrize("stop_after", [1, 3, 4, 5])
def test_stopped_and_resumed_equals_straight(tmp_path, monkeypatch, straight, stop_after):
    out = tmp_path / "run"
    real = _stop_at(monkeypatch, cli, "_finetune", stop_after)
    with pytest.raises(Stop):
        _run(out)
    assert (out / "progress" / "run.json").exists() and not (out / "results.json").exists()
    done = {p.stem for p in (out / "progress").glob("*.json")} - {"run"}
    assert "zero_shot" in done and "baselines" in done

    # a plain run does not overwrite it
    monkeypatch.setattr(cli, "_finetune", real)
    rc, log = _run(out)
    assert rc == 2 and "unfinished run" in log and "--resume" in log, log

    fts, cals = _count(monkeypatch, "_finetune"), _count(monkeypatch, "_prune")
    rc, log = _run(out, "--resume")
    assert rc == 0, log
    assert re.search(r"resume: [1-9]\d* finished stage", log), log
    assert len(fts) == 6 - stop_after  # no finished fine-tune trained again
    # calibrations (journaled when they end, before the fine-tune that stopped): 0 and 1 of the grid
    # unless finished, and the second seed's (part of its seed stage, so run again at stop 5)
    assert len(cals) == {1: 3, 3: 2, 4: 1, 5: 1}[stop_after]
    res = json.loads((out / "results.json").read_text())
    assert _numbers(res) == _numbers(straight)
    assert set(res["resumed_stages"]) >= {"zero_shot", "baselines"}
    assert not (out / "progress").exists()
    assert (out / "sparsity.png").stat().st_size > 0 and (out / "pruned_model" / "meta.json").exists()


def test_resume_refuses_other_settings(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _stop_at(monkeypatch, cli, "_finetune", 0)
    with pytest.raises(Stop):
        _run(out)
    monkeypatch.undo()
    rc, log = _run(out, "--resume", "--horizon", "12")
    assert rc == 2, log
    line = log.strip().splitlines()[-1]
    assert "--resume" in line and "horizon" in line and "24" in line and "12" in line, line
    assert (out / "progress" / "zero_shot.json").exists()  # nothing it had is lost

    # the same options over other data (or another model) is another run too
    spec = out / "progress" / "run.json"
    run = json.loads(spec.read_text())
    run["data_sha256"] = "0" * 64
    spec.write_text(json.dumps(run))
    rc, log = _run(out, "--resume")
    assert rc == 2 and "data_sha256" in log.strip().splitlines()[-1], log


def test_resume_without_journal_starts_fresh(tmp_path, straight):
    out = tmp_path / "run"
    rc, log = _run(out, "--resume", "--threads", "1")
    assert rc == 0, log
    assert "starting from the beginning" in log
    assert _numbers(json.loads((out / "results.json").read_text())) == _numbers(straight)


def test_a_pick_whose_saved_model_is_gone_is_trained_again(tmp_path, monkeypatch, straight):
    """The journal's models are only used under their own tag: a missing one means the stage that
    made it runs again (same seed, same numbers)."""
    out = tmp_path / "run"
    # stops at the second scoring: zero-shot scored, both fine-tune grid points done, the pick not yet
    real = _stop_at(monkeypatch, cli, "_metrics", 1)
    with pytest.raises(Stop):
        _run(out)
    monkeypatch.setattr(cli, "_metrics", real)
    assert {"finetune_grid_0", "finetune_grid_1"} <= {p.stem for p in (out / "progress").glob("*.json")}
    (out / "progress" / "finetune_pick.pt").unlink()
    fts = _count(monkeypatch, "_finetune")
    rc, log = _run(out, "--resume")
    assert rc == 0, log
    assert len(fts) == 1 + 1 + 3  # the pick trained again, its second seed, 2 + 1 prune-then-finetune
    assert _numbers(json.loads((out / "results.json").read_text())) == _numbers(straight)


def test_stopped_between_saving_a_pick_and_its_record(tmp_path, monkeypatch, straight):
    """A stop after a grid point's pick model is saved but before its record is written: the
    saved model is not trusted under a record that does not exist; the point runs again."""
    from tsprune.journal import Journal

    out = tmp_path / "run"
    real = Journal.put

    def put(self, stage, record):
        if stage == "prune_finetune_grid_0":
            raise Stop("stopped")
        return real(self, stage, record)

    monkeypatch.setattr(Journal, "put", put)
    with pytest.raises(Stop):
        _run(out)
    assert (out / "progress" / "prune_finetune_pick.tag.json").exists()
    monkeypatch.setattr(Journal, "put", real)
    fts = _count(monkeypatch, "_finetune")
    rc, log = _run(out, "--resume")
    assert rc == 0, log
    assert len(fts) == 3  # prune-then-finetune grid points 0 and 1, its seed 1
    assert _numbers(json.loads((out / "results.json").read_text())) == _numbers(straight)


def _bench_accuracy():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_accuracy.py"
    spec = importlib.util.spec_from_file_location("bench_accuracy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_resumed_from_records_alone_in_another_checkout(tmp_path, monkeypatch, straight, straight_out):
    """bench_accuracy's snapshot keeps a stopped cell's records, no model; restored under another
    folder (a new checkout), the resume re-makes every model a later stage needs (same seeds) and
    ends with the straight run's numbers and pruned model; a finished cell's snapshot is removed."""
    ba = _bench_accuracy()
    runs, store = tmp_path / "runs", tmp_path / "store"
    real = _stop_at(monkeypatch, cli, "_finetune", 5)  # stopped in the last seed of prune-then-finetune
    with pytest.raises(Stop):
        _run(runs / "synthetic_h24")
    monkeypatch.setattr(cli, "_finetune", real)
    assert ba.snapshot_progress(runs, store) == ["synthetic_h24"]
    kept = sorted(f.name for f in (store / "synthetic_h24").iterdir())
    assert "run.json" in kept and "prune_finetune_seed_0.json" in kept
    assert all(f.endswith((".json", ".png")) and not f.endswith(".tag.json") for f in kept), kept

    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temp copy left
    other = tmp_path / "checkout" / "runs"
    assert ba.restore_progress(other, store) == ["synthetic_h24"]
    assert ba.restore_progress(other, store) == []  # a cell folder already there is left alone
    (other / "other_h1").mkdir()  # a cell emptied by hand to start over is not refilled either
    shutil.copytree(store / "synthetic_h24", store / "other_h1")
    assert ba.restore_progress(other, store) == [] and not any((other / "other_h1").iterdir())
    shutil.rmtree(store / "other_h1")
    fts, cals = _count(monkeypatch, "_finetune"), _count(monkeypatch, "_prune")
    rc, log = _run(other / "synthetic_h24", "--resume")
    assert rc == 0, log
    # the stopped seed (a calibration and a fine-tune), then the picked model, lost with the
    # snapshot: its calibration and its fine-tune again
    assert (len(fts), len(cals)) == (2, 2)
    assert _numbers(json.loads((other / "synthetic_h24" / "results.json").read_text())) == _numbers(straight)
    assert _saved_sha(other / "synthetic_h24" / "pruned_model") == _saved_sha(straight_out / "pruned_model")
    assert ba.snapshot_progress(other, store) == [] and not (store / "synthetic_h24").exists()


def _as_if_from_another_machine(prog):
    """Drop the saved models (as a snapshot does) and nudge the calibration records."""
    for f in prog.iterdir():
        if not f.name.endswith(".json") or f.name.endswith(".tag.json"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    for f in prog.glob("calibration_*.json"):
        rec = json.loads(f.read_text())
        rec["val_loss_masked"] += 1e-9
        f.write_text(json.dumps(rec))


def test_a_remade_model_that_differs_from_its_record_is_refused(tmp_path, monkeypatch):
    """Records made elsewhere (another machine or build): the calibration re-made from its record
    does not reproduce it, and the resume stops with one line instead of mixing two runs; with
    --accept-remade-drift it goes on and results.json lists the difference."""
    out = tmp_path / "run"
    real = _stop_at(monkeypatch, cli, "_finetune", 5)
    with pytest.raises(Stop):
        _run(out)
    monkeypatch.setattr(cli, "_finetune", real)
    prog = out / "progress"
    _as_if_from_another_machine(prog)
    rc, log = _run(out, "--resume")
    assert rc == 2, log
    line = log.strip().splitlines()[-1]
    assert "made again from its record" in line and "val_loss_masked" in line and "another machine" in line, line
    assert "--accept-remade-drift" in line
    assert (prog / "run.json").exists()  # nothing it had is lost

    rc, log = _run(out, "--accept-remade-drift")  # without --resume: a one-line refusal, nothing touched
    assert rc == 2 and "--accept-remade-drift only applies to a resumed run" in log.strip().splitlines()[-1], log
    assert (prog / "run.json").exists()

    _as_if_from_another_machine(prog)
    seeds = {f.name: json.loads(f.read_text()) for f in prog.glob("*_seed_*.json")}
    assert seeds
    rc, log = _run(out, "--resume", "--accept-remade-drift")
    assert rc == 0, log
    assert "WARNING" in log and "differs from it" in log
    res = json.loads((out / "results.json").read_text())
    drift = res["resume_drift"]
    assert drift and all(d["what"].endswith("val_loss_masked") for d in drift), drift
    assert all(abs(d["recorded"] - d["remade"] - 1e-9) < 1e-12 for d in drift), drift  # the nudge, exactly
    assert res["stage_cpus"] and "unknown" not in res["stage_cpus"]
    for name, rec in seeds.items():  # every recorded test number is reported as it was measured
        kind = "finetune" if name.startswith("finetune") else "prune_finetune"
        assert rec["mse"] in [r["mse"] for r in res[kind]["seeds"]], (name, res[kind]["seeds"])


GRID2 = ["--grid-ptf-lr", "0.002,0.004", "--seeds", "1"]


@pytest.fixture(scope="module")
def straight_rates(tmp_path_factory, _one_thread):
    out = tmp_path_factory.mktemp("straight_rates") / "run"
    rc, log = _run(out, *GRID2)
    assert rc == 0, log
    return _numbers(json.loads((out / "results.json").read_text()))


@pytest.mark.parametrize("lose_model", [False, True])
def test_several_rates_per_calibration(tmp_path, monkeypatch, straight_rates, lose_model):
    """Two lrs share each calibration: stopped in the second calibration's first fine-tune, the
    resume loads that calibration's pruned model instead of calibrating again, retrains nothing
    finished, and equals the straight run. If that saved model is gone, its record is forgotten and
    the calibration runs once more (same seed: the same numbers)."""
    # stops prune-then-finetune grid point 2 after its calibration (1) finished
    real = _stop_at(monkeypatch, cli, "_finetune", 4)
    out = tmp_path / "run"
    with pytest.raises(Stop):
        _run(out, *GRID2)
    monkeypatch.setattr(cli, "_finetune", real)
    prog = out / "progress"
    assert (prog / "calibration_1.json").exists() and (prog / "calibration_1.tag.json").exists()
    if lose_model:
        shutil.rmtree(prog / "calibration_1")
    fts, cals = _count(monkeypatch, "_finetune"), _count(monkeypatch, "_prune")
    rc, log = _run(out, *GRID2, "--resume")
    assert rc == 0, log
    # grid points 2 and 3 on calibration 1: read back from disk, or calibrated once more if lost
    assert (len(fts), len(cals)) == (2, 1 if lose_model else 0)
    res = json.loads((out / "results.json").read_text())
    assert _numbers(res) == straight_rates
    assert ("calibration_1" in res["resumed_stages"]) is not lose_model


def test_model_sha256_covers_0dim_buffers_and_every_byte():
    import torch
    from torch import nn

    from tsprune.journal import model_sha256

    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))  # num_batches_tracked: a 0-dim int64
    h = model_sha256(m)
    m[1].num_batches_tracked += 1
    assert model_sha256(m) != h
    m[1].num_batches_tracked -= 1
    with torch.no_grad():
        m[0].weight[1, 2] = torch.nextafter(m[0].weight[1, 2], torch.tensor(2.0))
    assert model_sha256(m) != h
