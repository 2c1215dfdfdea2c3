"""LoRA recovery (finetune(lora=R), --lora-rank) through peft: adapters on every Linear of a pruned
model, merged at the end into plain weights of the pruned shapes.

(1) merge_lora: the peft-wrapped model and the merged one compute the same outputs (float64; every
family of the conformance table, pruned), with the original module classes, names and shapes back;
(2) finetune(lora=R) trains only rank-R updates of the Linear weights, keeps the best adapters
(the returned model scores the kept validation loss), returns the start exactly when nothing beat
it, and leaves no peft module behind; (3) save_pruned / load_pruned round trip without LoRA keys;
(4) the CLI option: range check, help, and an end-to-end run recording the rank.
"""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

from test_adapters import CASES, n_params
from tsprune import Pruner, load_pruned, save_pruned
from tsprune.adapters import get_adapter
from tsprune.data import WindowDataset
from tsprune.train import add_lora, finetune, lora_settings, mean_loss, merge_lora


def _pruned(name: str, dtype=torch.float64) -> nn.Module:
    """The case's model with ~40% of every mask's units zeroed by hand, repacked (eval mode)."""
    case = CASES[name]
    model = case.build().to(dtype)
    pruner = Pruner(model, block=case.block)
    g = torch.Generator().manual_seed(1)
    for m in pruner.masks.values():
        m[torch.rand(m.shape, generator=g) < 0.4] = 0
    small = pruner.repack().eval()
    assert n_params(small) < n_params(model)
    return small


def _layout(model: nn.Module) -> dict:
    return {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}


def _classes(model: nn.Module) -> dict:
    return {n: type(m) for n, m in model.named_modules()}


def _no_peft(model: nn.Module) -> bool:
    return not any(type(m).__module__.startswith("peft") for m in model.modules())


@pytest.mark.parametrize("name", list(CASES))
def test_merge_matches_the_wrapped_model(name):
    case = CASES[name]
    small = _pruned(name)
    layout, classes = _layout(small), _classes(small)
    g = torch.Generator().manual_seed(2)
    ctx, _ = case.inputs(g)
    ctx = ctx.double()
    ref = case.output(small, ctx)
    info = add_lora(small, 4)
    assert info["modules"] > 0 and not _no_peft(small)
    trainable = {n for n, p in small.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert info["trainable_params"] == sum(p.numel() for p in small.parameters() if p.requires_grad)
    # B = 0 at init: nothing changes (to rounding: peft's forward adds a zero branch)
    assert (case.output(small, ctx) - ref).abs().max() <= 1e-12 * ref.abs().max()
    with torch.no_grad():  # non-zero adapters, so that merging has something to do
        for n, p in small.named_parameters():
            if ".lora_" in n:
                p.normal_(0.0, 0.1, generator=g)
    wrapped = case.output(small, ctx)
    assert (wrapped - ref).abs().max() > 1e-3 * ref.abs().max()  # the adapters act
    merge_lora(small)
    merged = case.output(small, ctx)
    # float64 model; some families hand back a float32 forecast: compare at that precision
    tol = 1e-10 if merged.dtype == torch.float64 else 2e-6
    assert (merged - wrapped).abs().max() <= tol * wrapped.abs().max()
    assert _layout(small) == layout and _classes(small) == classes and _no_peft(small)
    assert not hasattr(small, "peft_config")


def test_classic_chronos_tied_lm_head_is_left_alone():
    small = _pruned("chronos")
    info = add_lora(small, 2)
    assert list(info["skipped"]) == ["model.lm_head"] and "tied" in info["skipped"]["model.lm_head"]
    merge_lora(small)
    t5 = small.model
    assert t5.lm_head.weight is t5.shared.weight


def test_unmerged_drop_restores_the_weights_exactly():
    small = _pruned("chronos-bolt")
    before = {n: p.detach().clone() for n, p in small.named_parameters()}
    add_lora(small, 4)
    with torch.no_grad():
        for n, p in small.named_parameters():
            if ".lora_" in n:
                p.normal_()
    merge_lora(small, merge=False)
    assert all(torch.equal(p, before[n]) for n, p in small.named_parameters())


def _data(model):
    cc = model.config.chronos_config
    g = torch.Generator().manual_seed(0)
    series = torch.randn(260, 2, generator=g).cumsum(0).numpy()
    train = WindowDataset(series[:180], cc["context_length"], cc["prediction_length"])
    val = WindowDataset(series[150:], cc["context_length"], cc["prediction_length"])
    return train, val


@pytest.fixture(scope="module")
def bolt():
    small = _pruned("chronos-bolt")
    return small, get_adapter(small), *_data(small)


def test_finetune_lora_trains_low_rank_updates_and_merges(bolt, tmp_path):
    small, adapter, train, val = bolt
    model = copy.deepcopy(small)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = finetune(model, adapter, train, val, steps=4, lr=1e-2, batch_size=16, eval_every=2, lora=4)
    assert res["lora"]["rank"] == 4 and res["lora"]["alpha"] == 8.0 and res["kept_step"] > 0
    assert res["lora"]["modules"] == sum(isinstance(m, nn.Linear) for m in small.modules())
    # same model: classes, names, shapes, count; no peft left; requires_grad as it came
    assert _layout(model) == _layout(small) and _classes(model) == _classes(small) and _no_peft(model)
    assert n_params(model) == n_params(small) and not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # only Linear weights moved, each by an update of rank <= 4
    lin_w = {f"{n}.weight" for n, m in small.named_modules() if isinstance(m, nn.Linear)}
    ref, changed = dict(small.named_parameters()), 0
    for n, p in model.named_parameters():
        d = (p - ref[n]).detach()
        if n not in lin_w:
            assert torch.equal(p, ref[n]), n
        elif d.abs().max() > 0:
            changed += 1
            s = torch.linalg.svdvals(d)
            assert len(s) <= 4 or s[4:].max() <= 1e-8 * s[0], n
    assert changed > 0
    # the kept adapters were merged: the returned model scores the kept validation loss
    assert mean_loss(model, adapter, val, 64) == pytest.approx(res["kept_val"], rel=1e-9)
    # (3) a plain save: no LoRA tensors, reloads without peft's layers, same outputs
    save_pruned(model, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "lora" in k or "base_layer" in k]
    back = load_pruned(tmp_path / "m", dtype=None)
    assert _layout(back) == _layout(model) and _no_peft(back)
    ctx, _ = CASES["chronos-bolt"].inputs(torch.Generator().manual_seed(3))
    assert torch.equal(CASES["chronos-bolt"].output(back, ctx.double()),
                       CASES["chronos-bolt"].output(model, ctx.double()))


def test_finetune_lora_keeps_the_best_not_the_last(bolt):
    """A diverging lr: the best check is an early one; its adapters (not the last) are merged."""
    small, adapter, train, val = bolt
    model = copy.deepcopy(small)
    res = finetune(model, adapter, train, val, steps=3, lr=0.3, batch_size=16, eval_every=1, lora=4)
    vals = [h["val"] for h in res["history"]]
    assert 0 < res["kept_step"] < 3 and res["kept_val"] == min(vals) < vals[-1]
    assert mean_loss(model, adapter, val, 64) == pytest.approx(res["kept_val"], rel=1e-9)


def test_finetune_lora_keeping_the_start_returns_it_exactly(bolt):
    small, adapter, train, val = bolt
    model = copy.deepcopy(small)
    res = finetune(model, adapter, train, val, steps=1, lr=0.0, batch_size=16,
                   lora={"rank": 2, "alpha": 4, "dropout": 0.1})
    assert res["kept_step"] == 0 and res["lora"]["dropout"] == 0.1 and _no_peft(model)
    assert all(torch.equal(p, dict(small.named_parameters())[n]) for n, p in model.named_parameters())


def test_lora_settings_and_missing_peft(bolt, monkeypatch):
    assert lora_settings(None) is None and lora_settings(0) is None
    assert lora_settings(8) == {"rank": 8, "alpha": 16.0, "dropout": 0.0}
    for bad in (-1, 1.5, True, {"rank": 2, "alpha": 0}, {"alpha": 2}, {"rank": 2, "foo": 1}):
        with pytest.raises(ValueError):
            lora_settings(bad)
    small, adapter, train, val = bolt
    model = copy.deepcopy(small)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match="pip install peft"):
        finetune(model, adapter, train, val, steps=1, lora=4)
    assert _layout(model) == _layout(small) and _no_peft(model)


# -- (4) the CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("val", ["-1", "x"])
def test_cli_lora_rank_is_range_checked(val, capsys, tmp_path):
    from tsprune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "--out", str(tmp_path / "o"), "--lora-rank", val])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lora-rank" in err and err.startswith("tsprune run: error:")
    assert not (tmp_path / "o").exists()


def test_cli_help_shows_lora_rank(capsys):
    from tsprune.cli import main

    for cmd in ("run", "finetune"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--lora-rank" in out and "(0: full fine-tuning) (default: 0)" in out


def test_cli_run_with_lora_rank(tmp_path):
    from tsprune.cli import main

    out = tmp_path / "run"
    rc = main(["run", "--data", "synthetic", "--horizon", "24", "--out", str(out), "--no-progress",
               "--max-train-windows", "128", "--max-eval-windows", "32", "--max-val-windows", "64",
               "--batch-size", "32", "--macro-batch-size", "64", "--prune-ratio-per-epoch", "0.5",
               "--calib-epochs", "1", "--ft-max-steps", "2", "--lookback", "256", "--lora-rank", "4"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["lora_rank"] == 4
    for k in ("finetune", "prune_finetune"):
        assert res[k]["lora_rank"] == 4 and res[k]["train"]["lora"]["rank"] == 4
    from safetensors import safe_open

    with safe_open(str(out / "pruned_model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    assert _no_peft(load_pruned(out / "pruned_model"))
