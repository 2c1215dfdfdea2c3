"""`tsprune run` / `evaluate` end to end on the embedded default model and the synthetic task:
fewer train windows than a macro-batch still prune, a run that prunes nothing says so, the shape
of results.json / results.md (full or capped test set, baselines on the same windows), --search
picks by validation, --seeds gives a std, every option's --help, and what the log says about the
kept calibration epoch and the losses.

Tiny settings throughout (lookback 64, horizon 24, 48 train windows, 64 validation windows,
2 fine-tune steps): a run takes a few seconds on one core.
"""
import argparse
import contextlib
import io
import json
import math
import re

import pytest

from tsprune import cli
from tsprune.cli import main

TRAIN = 48  # fewer train windows than the default --macro-batch-size (1024)

FAST = ["--data", "synthetic", "--horizon", "24", "--lookback", "64", "--no-progress",
        "--max-train-windows", str(TRAIN), "--max-val-windows", "64", "--batch-size", "16",
        "--calib-epochs", "2", "--ft-max-steps", "2"]


def _run(out, *extra) -> tuple[int, str, str]:
    """main(["run", ...]) with stdout and stderr (the log) captured: (rc, stdout, stderr)."""
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(["run", *FAST, "--out", str(out), *extra])
    return rc, o.getvalue(), e.getvalue()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, _one_thread):
    """The default macro-batch (1024) on 48 train windows, every test window (no --max-eval-windows);
    a generous --val-tolerance so the pruned masks are kept."""
    out = tmp_path_factory.mktemp("full") / "run"
    rc, stdout, stderr = _run(out, "--prune-ratio-per-epoch", "0.5", "--val-tolerance", "10")
    assert rc == 0, stderr
    return {"out": out, "res": json.loads((out / "results.json").read_text()),
            "md": (out / "results.md").read_text(), "stdout": stdout, "log": stderr}


# ---- 1. fewer train windows than the macro-batch ---------------------------------------------------
def test_fewer_train_windows_than_macro_batch_still_prune(full_run):
    res, log = full_run["res"], full_run["log"]
    assert res["config"]["macro_batch_size"] == 1024
    assert res["task"]["train_windows"] == TRAIN
    rep = res["prune_finetune"]["prune"]
    assert rep["macro_batch_size"] == TRAIN  # cut to the epoch
    assert f"macro-batch cut from 1024 to the epoch's {TRAIN} train windows" in log
    assert any("macro-batch cut from 1024" in n for n in rep["calibration_notes"])
    assert rep["calibration"][1]["macro_steps"] >= 1
    assert rep["pruned_units_fraction"] > 0 and not res["nothing_pruned"]
    assert res["prune_finetune"]["params"] < res["finetune"]["params"]
    assert res["prune_finetune"]["params_removed_fraction"] > 0


def test_pruner_sample_counter_restarts_each_epoch():
    import tsprune
    from tsprune.models import load_model

    p = tsprune.Pruner(load_model("default"), macro_batch_size=100, samples_per_epoch=250)
    assert p.step(30) is None and p.pending_samples == 30
    p.start_epoch()  # a new epoch: the previous epoch's samples do not count towards this one's macro-batch
    assert p.pending_samples == 0
    assert p.step(80) is None and p.pending_samples == 80  # 30 + 80 > 100 would have stepped
    assert p.macro_steps == 0
    info = p.finish_epoch()  # the epoch's tail gets its own macro step, not carried over
    assert info is not None and p.macro_steps == 1 and p.pending_samples == 0
    assert p.finish_epoch() is None and p.macro_steps == 1  # nothing pending: no step


def test_calibrate_steps_on_every_epoch_tail():
    """48 windows, micro-batch 16, macro-batch 30: one step at 32 windows, one on the last 16, in
    every epoch (the counter restarts, so both epochs run the same 2 steps)."""
    import tsprune
    from tsprune.data import make_task
    from tsprune.models import load_model
    from tsprune.train import calibrate

    task = make_task("synthetic", 64, 24, max_train_windows=TRAIN)
    model = load_model("default")
    p = tsprune.Pruner(model, prune_ratio_per_epoch=0.05, macro_batch_size=30, samples_per_epoch=TRAIN)
    logs: list[str] = []
    r = calibrate(model, p, task.train, task.val.capped(16), epochs=2, batch_size=16, val_tolerance=10.0,
                  log=logs.append)
    assert [h.get("macro_steps") for h in r.history] == [None, 2, 4]
    tails = [line for line in logs if "a macro step on the epoch's last 16 windows (a partial macro-batch)" in line]
    assert len(tails) == 2, logs
    assert r.history[-1]["pruned"] > 0


# ---- 2. nothing pruned ------------------------------------------------------------------------------
def test_nothing_pruned_is_loud_and_recorded(tmp_path):
    # a big pruning step that hurts validation, and no tolerance: calibration keeps epoch 0 (no pruning)
    out = tmp_path / "run"
    rc, stdout, log = _run(out, "--prune-ratio-per-epoch", "0.5", "--val-tolerance", "0",
                           "--max-eval-windows", "32")
    assert rc == 0, log
    res = json.loads((out / "results.json").read_text())
    rep = res["prune_finetune"]["prune"]
    assert rep["best_epoch"] == 0 and rep["pruned_units_fraction"] == 0.0
    assert rep["nothing_pruned"] is True and res["nothing_pruned"] is True
    assert res["prune_finetune"]["params"] == res["finetune"]["params"] == res["zero_shot"]["params"]
    assert "WARNING: NOTHING WAS PRUNED" in log
    assert "NOTHING is pruned" in log  # calibrate's reason
    assert "WARNING: nothing was pruned" in stdout
    assert "WARNING: nothing was pruned" in (out / "results.md").read_text()


# ---- 3. results.json / results.md ------------------------------------------------------------------
def test_results_json_every_test_window_by_default(full_run):
    res = full_run["res"]
    n = res["zero_shot"]["test_windows"]
    assert n == res["zero_shot"]["test_windows_available"] == res["task"]["test_windows_available"] > 1000
    for key in ("zero_shot", "finetune", "prune_finetune"):
        r = res[key]
        assert {"mse", "mae", "params"} <= set(r), key
        assert math.isfinite(r["mse"]) and math.isfinite(r["mae"]) and r["params"] > 0
        assert r["test_windows"] == r["test_windows_available"] == n, key
    assert set(res["baselines"]) == {"seasonal_naive", "linear"}
    for key, r in res["baselines"].items():
        assert {"mse", "mae", "params"} <= set(r), key
        assert math.isfinite(r["mse"]) and math.isfinite(r["mae"])
        assert r["test_windows"] == r["test_windows_available"] == n, key
    assert res["baselines"]["seasonal_naive"]["params"] == 0 and res["baselines"]["linear"]["params"] > 0
    assert not re.search(r"\d of \d", full_run["md"])  # no "N of M": the whole test set
    assert f"| {n:,} |" in full_run["md"]


def test_results_md_table(full_run):
    md = full_run["md"]
    header = next(line for line in md.splitlines() if line.startswith("| # |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    for col in ("MSE", "MAE", "params", "params removed", "units pruned", "test windows", "ms / window",
                "beats (lower MSE than)"):
        assert col in cols, (col, cols)
    for name in ("zero-shot", "fine-tune", "prune-then-finetune", "seasonal naive", "linear (ridge)"):
        assert f"| {name} |" in md, name
    order = next(line for line in md.splitlines() if line.startswith("By test MSE (lower is better): "))
    assert order.count(" < ") == 4
    res = full_run["res"]  # the row of the lowest MSE beats every other one
    best = min([*(res[k] for k in ("zero_shot", "finetune", "prune_finetune")), *res["baselines"].values()],
               key=lambda r: r["mse"])
    assert f"{best['mse']:.4f}" in order.split(" < ")[0]


def test_capped_test_set_says_n_of_m_and_baselines_share_it(tmp_path):
    out = tmp_path / "run"
    rc, _, log = _run(out, "--max-eval-windows", "40", "--prune-ratio-per-epoch", "0.5", "--val-tolerance", "10",
                      "--seeds", "2")
    assert rc == 0, log
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    m = res["task"]["test_windows_available"]
    for r in (res["zero_shot"], res["finetune"], res["prune_finetune"], *res["baselines"].values()):
        assert r["test_windows"] == 40 < r["test_windows_available"] == m
    assert md.count(f"| 40 of {m:,} |") == 5
    # ---- 5. --seeds 2: mean and std for both trained settings
    for key in ("finetune", "prune_finetune"):
        r = res[key]
        for k in ("mse_std", "mae_std"):
            assert k in r and math.isfinite(r[k]) and r[k] >= 0, (key, k)
        assert [s["seed"] for s in r["seeds"]] == [0, 1]
        assert r["mse"] == pytest.approx(sum(s["mse"] for s in r["seeds"]) / 2)
        assert r["mae"] == pytest.approx(sum(s["mae"] for s in r["seeds"]) / 2)
    assert md.count(" ± ") >= 4  # MSE and MAE of both trained rows
    # inference speed measured side by side: the table's ms / window come from it (fine-tune has
    # the zero-shot model's shapes, so its number is the full model's)
    sp = res["speed"]
    assert sp["ms_per_window"]["full"] > 0 and sp["ms_per_window"]["pruned"] > 0
    assert sp["speedup"] == pytest.approx(sp["ms_per_window"]["full"] / sp["ms_per_window"]["pruned"], rel=1e-2)
    assert res["zero_shot"]["ms_per_window"] == res["finetune"]["ms_per_window"] == sp["ms_per_window"]["full"]
    assert res["prune_finetune"]["ms_per_window"] == sp["ms_per_window"]["pruned"]
    assert sp["windows"] == 40


def test_evaluate_caps_and_reports_windows(tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["evaluate", "--data", "synthetic", "--horizon", "24", "--lookback", "64", "--no-progress",
               "--max-eval-windows", "32", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "evaluate.json").read_text())
    assert r["test_windows"] == 32 < r["test_windows_available"]
    assert {"mse", "mae", "params", "ms_per_window"} <= set(r)


# ---- 4. --search ranks by validation ----------------------------------------------------------------
def test_search_picks_by_validation_not_test(tmp_path, monkeypatch):
    """Rigged validation: _kept_val_mse returns MINUS the candidate's test MSE, so the candidate that
    is WORSE on test has the lower 'validation MSE'. The pick must follow validation."""
    seen: dict = {}
    real_task, real_metrics = cli._task, cli._metrics
    calls: list[dict] = []

    def task(a, model):
        seen["task"] = real_task(a, model)
        return seen["task"]

    def rigged_val_mse(model, adapter, task, a, h):
        assert task is seen["task"]
        test = real_metrics(model, adapter, seen["task"].test, a)["mse"]
        calls.append({"test": test, "val": -test})
        return -test

    monkeypatch.setattr(cli, "_task", task)
    monkeypatch.setattr(cli, "_kept_val_mse", rigged_val_mse)
    out = tmp_path / "run"
    rc, _, log = _run(out, "--search", "--grid-lr", "0,0.003", "--grid-ptf-lr", "0,0.003", "--grid-prune-ratio", "0.5", "--grid-ema", "0.5",
                      "--val-tolerance", "10", "--max-eval-windows", "48")
    assert rc == 0, log
    res = json.loads((out / "results.json").read_text())
    s = res["search"]
    assert s["metric"] == "validation MSE"
    assert s["budget"] == {"finetune": 2, "prune_finetune": 2}
    assert len(calls) == 4  # 2 fine-tune + 2 prune-then-finetune candidates, nothing else ranked
    for key, rows in (("finetune", calls[:2]), ("prune_finetune", calls[2:])):
        grid = s[key]
        assert [g["lr"] for g in grid] == [0.0, 0.003]
        assert [g["val_mse"] for g in grid] == pytest.approx([c["val"] for c in rows])
        tests = [c["test"] for c in rows]
        assert abs(tests[0] - tests[1]) > 1e-6, f"{key}: both candidates equal on test, the check proves nothing"
        for g in grid:  # test metrics only for the pick
            assert not {"mse", "mae", "test_windows"} & set(g), g
        pick = min(range(2), key=lambda i: grid[i]["val_mse"])
        worse_on_test = max(range(2), key=lambda i: tests[i])
        assert pick == worse_on_test
        assert res[key]["hyper"]["lr"] == grid[pick]["lr"] == s["picked"][key]["lr"]
        assert res[key]["val_mse"] == pytest.approx(grid[pick]["val_mse"])
        assert res[key]["mse"] == pytest.approx(tests[pick], rel=1e-6)  # the picked model is what was scored
    assert "settings picked by validation MSE (--search)" in (out / "results.md").read_text()


def test_search_reuses_the_kept_val_mse_exactly(tmp_path, monkeypatch):
    """--search ranks candidates by the validation MSE their fine-tune kept them by (no second pass)
    and gives every fine-tune from the base model the base's validation MSE once: both must equal
    a fresh validation pass over the returned model, and finetune(start_score=) must train exactly
    as without it."""
    import copy

    import torch

    from tsprune.train import finetune

    fresh: list[tuple[float, float]] = []
    real = cli._kept_val_mse
    starts: list = []
    real_ft = cli._finetune

    def checked(model, adapter, task, a, h):
        v = real(model, adapter, task, a, h)
        fresh.append((v, cli._val_mse(model, adapter, task.val, a)))
        return v

    seen: dict = {}

    def ft(*args, **kw):
        starts.append(kw.get("start"))
        seen["task"], seen["a"] = args[2], args[3]
        return real_ft(*args, **kw)

    monkeypatch.setattr(cli, "_kept_val_mse", checked)
    monkeypatch.setattr(cli, "_finetune", ft)
    rc, _, log = _run(tmp_path / "run", "--search", "--grid-lr", "0.001,0.003", "--grid-prune-ratio", "0.5",
                      "--grid-ema", "0.5", "--seeds", "2", "--val-tolerance", "10", "--max-eval-windows", "32",
                      "--select", "mse")
    assert rc == 0, log
    assert len(fresh) == 6  # 2 + 1 fine-tune, 2 + 1 prune-then-finetune
    for reused, measured in fresh:
        assert reused == measured  # bit-identical: the kept weights, the same windows and batch
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    ft_starts = starts[:3]
    assert all(s is not None for s in ft_starts) and len(set(ft_starts)) == 1
    assert all(r["train"]["start_val"] == ft_starts[0] for r in res["search"]["finetune"])
    assert starts[3:] == [None] * 3  # every pruned model is a new start: measured inside finetune

    from tsprune.adapters import get_adapter
    from tsprune.data import make_task
    from tsprune.models import load_model

    base = load_model("default")
    ad = get_adapter(base)
    assert ft_starts[0] == cli._val_mse(base, ad, seen["task"].val, seen["a"])  # the base's own val MSE

    # selection by the model's own loss: the shared start is the base's validation LOSS
    from tsprune.train import val_score

    starts.clear()
    rc, _, log = _run(tmp_path / "run_loss", "--search", "--grid-lr", "0.001,0.003", "--grid-prune-ratio", "0.5",
                      "--grid-ema", "0.5", "--val-tolerance", "10", "--max-eval-windows", "32", "--select", "loss")
    assert rc == 0, log
    want = val_score(base, ad, seen["task"].val, "loss", seen["a"].eval_batch_size)
    assert starts[:2] == [want, want] and want != ft_starts[0]

    # start_score is evaluation 0 and nothing else: the same seed trains to the same weights
    task = make_task("synthetic", lookback=64, horizon=24, max_train_windows=32, max_eval_windows=32)
    kw = dict(steps=3, lr=1e-3, batch_size=16, eval_every=1, select="mse", eval_batch_size=64, seed=1)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    h1 = finetune(m1, ad, task.train, task.val, **kw)
    h2 = finetune(m2, ad, task.train, task.val, start_score=h1["start_val"], **kw)
    assert [x["val"] for x in h1["history"]] == [x["val"] for x in h2["history"]]
    for (n, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p, q), n


# ---- 6. --help --------------------------------------------------------------------------------------
def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    sub = _subparsers(cli.build_parser())
    assert set(sub.choices) == {"run", "prune", "finetune", "evaluate"}
    for ch in sub._choices_actions:
        assert ch.help and ch.help.strip(), ch.dest
        assert ch.dest in out
    assert "defaults" in out


@pytest.mark.parametrize("cmd", ["run", "prune", "finetune", "evaluate"])
def test_every_option_has_help_and_default(cmd, capsys):
    sp = _subparsers(cli.build_parser()).choices[cmd]
    assert issubclass(sp.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    opts = [a for a in sp._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert len(opts) >= 10
    for a in opts:
        assert a.help and a.help.strip() and a.help != argparse.SUPPRESS, a.option_strings
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for a in opts:
        assert a.option_strings[0] in text
    assert text.count("(default:") >= len(opts)


# ---- 7. the log: kept calibration epoch and why, named losses ----------------------------------------
def test_log_names_kept_epoch_reason_and_losses(full_run):
    log, rep = full_run["log"], full_run["res"]["prune_finetune"]["prune"]
    kept = [line for line in log.splitlines() if line.startswith("calibrate: kept the masks of epoch")]
    assert len(kept) == 1, log
    assert f"epoch {rep['best_epoch']} " in kept[0] and " because " in kept[0]
    assert rep["best_epoch"] >= 1 and rep["kept_because"] in kept[0]
    assert "finetune: kept the weights of step" in log or "finetune: WARNING: kept the STARTING weights" in log
    assert rep["loss"] == "quantile loss"
    # every loss in the log says which: the model's own (quantile) loss or the MSE
    named = re.findall(r"(\w+) loss\b", log)
    assert named and set(named) == {"quantile"}, set(named)
    assert "val quantile loss" in log and "train quantile loss" in log and "val MSE" in log
