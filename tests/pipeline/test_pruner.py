"""Pruner end to end on a tiny, randomly initialised Chronos-Bolt: mask gradients against per-sample
autograd, the schedule's arithmetic, repack exactness, save/load, and the CLI main job."""
import json
import math

import pytest
import torch

import tsprune
from tsprune.masking import attach_masks, detach_masks
from tsprune.pretrain import build_model

pytest.importorskip("chronos")


def tiny(seed=0):
    m = build_model(dict(d_model=32, d_kv=8, num_heads=4, d_ff=64,
                         chronos_config=dict(context_length=64, prediction_length=16)), seed=seed)
    # random init gives near-constant outputs; perturb so every unit matters a little
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _inputs(gen, b=5):
    ctx = torch.randn(b, 64, generator=gen).cumsum(-1)
    tgt = ctx[:, -16:] + torch.randn(b, 16, generator=gen)
    return ctx, tgt


@pytest.mark.parametrize("criterion", ["taylor", "taylor2"])
def test_arena_gradients_match_per_sample_autograd(criterion):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    m = tiny()
    pr = tsprune.Pruner(m, criterion=criterion, macro_batch_size=10**9)
    ctx, tgt = _inputs(gen)
    for p in m.parameters():
        p.requires_grad_(False)
    pr.attach()
    pr.adapter.loss(m, ctx, tgt).backward()
    pr.detach()
    # oracle: plain autograd masks (float64 model), one sample at a time; the model's loss is a
    # batch mean, so sample i's share of the batch gradient is its own gradient / B
    m64 = m.double()
    masks = {n: torch.ones_like(v, dtype=torch.float64, requires_grad=True) for n, v in pr.masks.items()}
    attach_masks(m64, pr.sites, masks)
    per = []
    for i in range(len(ctx)):
        for v in masks.values():
            v.grad = None
        pr.adapter.loss(m64, ctx[i : i + 1].double(), tgt[i : i + 1].double()).backward()
        per.append({n: v.grad.clone() / len(ctx) for n, v in masks.items()})
    detach_masks(m64)
    # fp32 rounding is relative to the gradients flowing through the model, not to one mask's own:
    # a mask whose exact gradient is 0 (the decoder's self-attention q over its single token,
    # where the softmax is 1 whatever q is) gets fp32 residue of ~1e-13 on some CPUs
    per_n = {n: torch.stack([p[n] for p in per]) for n in masks}  # [samples, units] per mask
    big = max(float(g.abs().max()) for g in per_n.values())
    for n, g in per_n.items():
        scale = float(g.abs().max())
        atol = 2e-4 * scale + 1e-6 * big
        torch.testing.assert_close(pr.arena.grad_view(n).double(), g.sum(0), atol=atol, rtol=1e-3)
        if criterion == "taylor2":
            torch.testing.assert_close(pr.arena.sq_view(n).double(), g.square().sum(0),
                                       atol=2e-4 * scale**2 + 1e-6 * big**2, rtol=1e-3)


def test_schedule_arithmetic_and_cap():
    m = tiny()
    pr = tsprune.Pruner(m, prune_ratio_per_epoch=0.4, macro_batch_size=8, samples_per_epoch=40,
                        max_prune_ratio=0.5)
    assert math.isclose(pr.ratio_per_step(), 0.4 / 5)
    total = pr.arena.n_units
    gen = torch.Generator().manual_seed(0)
    assert pr.step(4) is None  # half a macro-batch: nothing yet
    pr.arena.grad.copy_(torch.rand(total, generator=gen) + 0.5)  # no zero scores
    info = pr.step(4)
    assert info.pruned == math.ceil(0.08 * total) and info.live == total - info.pruned
    live = info.live
    for _ in range(40):
        pr.arena.grad.copy_(torch.rand(total, generator=gen) + 0.5)
        info = pr.step(8)
        if pr.done:
            break
        assert info.pruned == math.ceil(0.08 * live)
        live = info.live
    assert pr.done and pr.arena.n_live() == total - math.floor(0.5 * total)
    assert pr.step(8).pruned == 0  # nothing after the cap


def test_masks_are_writable_and_repack_is_exact_and_saves(tmp_path):
    gen = torch.Generator().manual_seed(1)
    m = tiny(seed=1)
    pr = tsprune.Pruner(m, block=4).attach()
    for name, v in pr.masks.items():  # users may write masks directly
        v.copy_((torch.rand(v.shape, generator=gen) > 0.4).float())
    ctx, _ = _inputs(gen)
    with torch.no_grad():
        masked = m(context=ctx).quantile_preds
    before = {k: v.clone() for k, v in m.state_dict().items()}
    small = pr.repack()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(context=ctx).quantile_preds, masked, atol=1e-5, rtol=1e-5)
    tsprune.save_pruned(small, tmp_path / "p")
    loaded = tsprune.load_pruned(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(loaded(context=ctx).quantile_preds, small(context=ctx).quantile_preds)
    # overwrite keeps a complete directory; corrupt / partial directories fail clearly
    tsprune.save_pruned(small, tmp_path / "p")
    (tmp_path / "p" / "plan.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt JSON"):
        tsprune.load_pruned(tmp_path / "p")
    (tmp_path / "p" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        tsprune.load_pruned(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        tsprune.load_pruned(tmp_path / "nope")


def test_pruner_rejects_bad_arguments():
    m = tiny()
    with pytest.raises(ValueError, match="criterion"):
        tsprune.Pruner(m, criterion="random")
    with pytest.raises(ValueError, match="max_prune_ratio"):
        tsprune.Pruner(m, max_prune_ratio=1.0)
    with pytest.raises(TypeError, match="no tsprune adapter"):
        tsprune.Pruner(torch.nn.Linear(3, 3))


def test_cli_run_end_to_end_on_default_model(tmp_path):
    from tsprune.cli import main

    out = tmp_path / "run"
    rc = main(["run", "--data", "synthetic", "--horizon", "24", "--out", str(out), "--no-progress",
               "--max-train-windows", "256", "--max-eval-windows", "64", "--batch-size", "32",
               "--macro-batch-size", "64", "--prune-ratio-per-epoch", "0.5", "--calib-epochs", "2",
               "--val-tolerance", "0.05", "--ft-max-steps", "3", "--lookback", "256"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("zero_shot", "finetune", "prune_finetune"):
        assert {"mse", "mae", "params"} <= set(res[key])
        assert math.isfinite(res[key]["mse"]) and res[key]["params"] > 0
    rep = res["prune_finetune"]["prune"]
    assert rep["val_loss_masked"] == pytest.approx(rep["val_loss_repacked"], rel=1e-5)
    assert (out / "sparsity.png").stat().st_size > 1000
    assert (out / "pruned_model" / "meta.json").is_file()
    assert res["prune_finetune"]["params"] <= res["finetune"]["params"]


def test_cli_errors_are_clear(tmp_path, capsys):
    from tsprune.cli import main

    assert main(["evaluate", "--data", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path)]) == 2
    assert "neither meta.json" in capsys.readouterr().err
