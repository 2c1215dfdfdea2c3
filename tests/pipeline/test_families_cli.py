"""Chronos-2 and PatchTSMixer end to end from the CLI (issue 14 "Done when").

For each family a small random-init checkpoint is written with ``save_pretrained`` (config.json +
weights, as a downloaded hub checkpoint) and run through ``tsprune run --model DIR`` on the
synthetic task: zero-shot, full or LoRA fine-tuning, prune (calibrate, repack exactly) then
fine-tune, save. The saved pruned model then loads with ``tsprune.load_pruned``, forecasts through
its adapter, and ``tsprune evaluate`` on it reproduces the run's prune-then-finetune test MSE.
Horizon 16 is the models' own prediction length; horizon 40 takes the roll-out path (Chronos-2:
Chronos2Pipeline's long-horizon unroll; PatchTSMixer: forecast appended to the context).

The CLI tasks are channel-independent (data.py: every variable its own series), so Chronos-2's
multivariate group attention is not reachable from the CLI; it is checked here on the CLI's saved
pruned model through the adapter (``group_ids``).
"""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from test_adapters import _chronos2, _patchtsmixer
from tsprune import load_pruned
from tsprune.adapters import get_adapter
from tsprune.cli import main
from tsprune.models import n_params

warnings.filterwarnings("ignore", message=".*compiled CPU extension not loaded.*")

BUILD = {"chronos2": _chronos2, "patchtsmixer": _patchtsmixer}  # context 64, prediction length 16
CLASS = {"chronos2": "Chronos2Model", "patchtsmixer": "PatchTSMixerForPrediction"}
FAST = ["--data", "synthetic", "--no-progress", "--max-train-windows", "128", "--max-val-windows", "32",
        "--max-eval-windows", "32", "--batch-size", "32", "--eval-batch-size", "64", "--seed", "0"]
RUN = ["--macro-batch-size", "64", "--prune-ratio-per-epoch", "0.5", "--calib-epochs", "2",
       "--val-tolerance", "0.05", "--ft-max-steps", "3", "--calib-windows", "128"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> a local HF checkpoint directory of a small random-init model."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fam, build in BUILD.items():
        d = root / fam
        build().save_pretrained(str(d))
        assert (d / "config.json").is_file()
        out[fam] = d
    return out


@pytest.mark.parametrize(
    "family,lora,horizon",
    [("chronos2", 0, 16), ("chronos2", 2, 40), ("patchtsmixer", 0, 40), ("patchtsmixer", 2, 16)],
)
def test_run_prune_finetune_save_load_evaluate(checkpoints, tmp_path, family, lora, horizon):
    ckpt = checkpoints[family]
    out = tmp_path / "run"
    # --lookback omitted once per family: the CLI takes the model's own context length (64)
    task = ["--horizon", str(horizon)] + (["--lookback", "64"] if lora else [])
    rc = main(["run", "--model", str(ckpt), *FAST, *task, *RUN, "--out", str(out), "--lora-rank", str(lora)])
    assert rc == 0

    res = json.loads((out / "results.json").read_text())
    assert res["config"]["lora_rank"] == lora and res["task"]["lookback"] == 64
    for key in ("zero_shot", "finetune", "prune_finetune"):
        assert {"mse", "mae", "params"} <= set(res[key])
        assert math.isfinite(res[key]["mse"]) and math.isfinite(res[key]["mae"]) and res[key]["params"] > 0
    ft, pft = res["finetune"], res["prune_finetune"]
    assert ft["lora_rank"] == lora and pft["lora_rank"] == lora
    for row in (ft, pft):
        if lora:  # adapters trained, then merged: the kept model has the base's parameter count
            assert row["train"]["lora"]["rank"] == lora and row["train"]["lora"]["modules"] > 0
        else:
            assert not row["train"].get("lora")
    assert ft["params"] == res["zero_shot"]["params"]
    assert pft["params"] < ft["params"] and pft["pruned_units_fraction"] > 0 and not res["nothing_pruned"]
    rep = pft["prune"]
    assert rep["val_loss_masked"] == pytest.approx(rep["val_loss_repacked"], rel=1e-5)  # exact repack

    # the saved pruned model: loads without peft or masks, right class and size, finite forecasts
    saved = out / "pruned_model"
    model = load_pruned(saved)
    assert type(model).__name__ == CLASS[family]
    assert n_params(model) == pft["params"]
    assert not any("lora" in k for k in model.state_dict())
    ad = get_adapter(model)
    assert ad.family == family
    ctx = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)) * 2 + 1
    with torch.no_grad():
        y = ad.predict(model.eval(), ctx, horizon)
    assert y.shape == (3, horizon) and torch.isfinite(y).all()

    # evaluate on the same task: the saved model reproduces the run's test metrics
    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(saved), *FAST, *task, "--out", str(ev)]) == 0
    got = json.loads((ev / "evaluate.json").read_text())
    assert got["params"] == pft["params"]
    assert got["mse"] == pytest.approx(pft["mse"], rel=1e-4, abs=1e-6)
    assert got["mae"] == pytest.approx(pft["mae"], rel=1e-4, abs=1e-6)

    if family == "chronos2":
        _check_groups(model, ad, ctx, horizon)


def _check_groups(model, ad, ctx, horizon):
    """Several series forecast jointly (group attention) on the CLI's pruned Chronos-2: finite; a
    group of one series equals the series alone; where a group attention head survived pruning,
    the joint forecast of a 2-series group differs from the independent ones. (Calibrated on
    single series, group attention's q/k get zero scores and are pruned first: the survivors then
    average v over the group, which still mixes the series.)"""
    with torch.no_grad():
        alone = ad.predict(model, ctx, horizon)
        joint = ad.predict(model, ctx, horizon, group_ids=torch.tensor([0, 0, 1]))
    assert joint.shape == (3, horizon) and torch.isfinite(joint).all()
    torch.testing.assert_close(joint[2], alone[2], rtol=1e-4, atol=1e-5)
    group_heads = sum(blk.layer[1].self_attention.n_heads for blk in model.encoder.block)
    if group_heads:
        assert not torch.allclose(joint[:2], alone[:2], rtol=1e-4, atol=1e-5)
