"""Compaction during calibration (Pruner(compact=True)): the model shrinks in place to its live
units after every pruning macro-step, exactly.

For every family of the conformance table (tests/pipeline/test_adapters.py): the same seeded
calibration with compact=True and compact=False prunes exactly the same units at every macro-step in
float64, with losses equal to rounding (float64 1e-10, fp32 1e-5 relative); the compacted model is
the same object with fewer parameters; ``pruner.masks`` keeps the original sizes; ``repack()`` gives
the same model either way; ``detach()`` restores the original weights; restoring an earlier state
regrows the model.
"""
from __future__ import annotations

import pytest
import torch

from test_adapters import CASES, assert_exact, n_params
from tsprune import Pruner
from tsprune.train import frozen


def _inputs(case, g, dtype):
    ctx, tgt = case.inputs(g)
    return ctx.to(dtype), tgt.to(dtype)


def _calibrate(case, compact, dtype, steps=3, criterion="taylor", seed=0, heads=False):
    model = case.build().to(dtype).eval()  # eval: no dropout, both runs see the same function
    pruner = Pruner(model, criterion=criterion, ema=0.5, block=case.block, heads=heads,
                    prune_ratio_per_epoch=0.3, macro_batch_size=1, max_prune_ratio=0.8, compact=compact)
    g = torch.Generator().manual_seed(seed)
    losses, masks, params = [], [], []
    with frozen(model):
        pruner.attach()
        for _ in range(steps):
            ctx, tgt = _inputs(case, g, dtype)
            loss = pruner.adapter.loss(model, ctx, tgt, **case.loss_kw)
            loss.backward()
            losses.append(float(loss.detach()))
            pruner.step(1)
            masks.append({n: m.clone() for n, m in pruner.masks.items()})
            params.append(n_params(model))
    return model, pruner, losses, masks, params


@pytest.mark.parametrize("name", list(CASES))
def test_compact_prunes_the_same_units_float64(name):
    case = CASES[name]
    m0, p0, l0, k0, _ = _calibrate(case, False, torch.float64)
    m1, p1, l1, k1, params = _calibrate(case, True, torch.float64)
    full = n_params(case.build())
    assert p1.compacted and not p0.compacted
    for step, (a, b) in enumerate(zip(k0, k1)):
        assert a.keys() == b.keys()
        for n in a:
            assert a[n].shape == b[n].shape  # original sizes, zeros for what was removed
            assert torch.equal(a[n] != 0, b[n] != 0), f"step {step}: {n} differs"
    for x, y in zip(l0, l1):
        assert abs(x - y) <= 1e-10 * max(1.0, abs(x)), (l0, l1)
    assert params[-1] < full, "compaction removed nothing"
    assert p1.arena.n_live() < p1.arena.n_units
    # the same outputs as the masked full-size model, and repack from the original weights
    g = torch.Generator().manual_seed(7)
    ctx, _ = _inputs(case, g, torch.float64)
    with torch.no_grad():
        assert_exact(case.output(m1, ctx), case.output(m0, ctx))
        r0, r1 = p0.repack(), p1.repack()
        assert n_params(r0) == n_params(r1)
        assert_exact(case.output(r1, ctx), case.output(r0, ctx))


@pytest.mark.parametrize("name", ["chronos-bolt", "timesfm", "patchtst"])
@pytest.mark.parametrize("criterion", ["taylor2", "magnitude", "wanda"])
def test_compact_other_criteria_fp32(name, criterion):
    case = CASES[name]
    _, _, l0, k0, _ = _calibrate(case, False, torch.float32, criterion=criterion)
    _, p1, l1, k1, _ = _calibrate(case, True, torch.float32, criterion=criterion)
    assert p1.compacted
    for x, y in zip(l0, l1):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (l0, l1)
    # fp32 rounding may reorder near-ties; the first step sees the identical full model
    for n in k0[0]:
        assert torch.equal(k0[0][n] != 0, k1[0][n] != 0), n
    agree = sum(int(((k0[-1][n] != 0) == (k1[-1][n] != 0)).sum()) for n in k0[-1])
    assert agree >= 0.99 * p1.arena.n_units


def test_same_object_detach_restores_and_state_regrows():
    case = CASES["chronos-bolt"]
    ref = case.build().double().eval()
    model, pruner, _, masks, params = _calibrate(case, True, torch.float64, steps=3)
    assert isinstance(model, type(ref))
    state_first = None
    # restore the state after the first step: the model regrows to that step's live units
    m2, p2, _, _, params2 = _calibrate(case, True, torch.float64, steps=1)
    state_first = p2.state_dict()
    pruner.load_state_dict(state_first)
    assert n_params(model) == params2[0] > params[-1]
    for n, m in pruner.masks.items():
        assert torch.equal(m != 0, masks[0][n] != 0)
    g = torch.Generator().manual_seed(3)
    ctx, _ = _inputs(case, g, torch.float64)
    with torch.no_grad():
        assert_exact(case.output(model, ctx), case.output(m2, ctx))
    ident = id(model)
    pruner.detach()
    assert id(model) == ident and not pruner.compacted
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k
    with torch.no_grad():
        assert_exact(case.output(model, ctx), case.output(ref, ctx))


def test_calibrate_compacts_by_default_and_matches_masks_only():
    from tsprune.data import WindowDataset
    from tsprune.train import calibrate

    case = CASES["chronos-bolt"]
    g = torch.Generator().manual_seed(0)
    series = torch.randn(400, 3, generator=g).cumsum(0).numpy()
    ctx_len = case.build().config.chronos_config["context_length"]
    hor = case.build().config.chronos_config["prediction_length"]
    train = WindowDataset(series[:300], ctx_len, hor)
    val = WindowDataset(series[250:], ctx_len, hor)
    out = {}
    for compact in (None, False):
        model = case.build().double()
        pruner = Pruner(model, criterion="taylor", block=case.block, prune_ratio_per_epoch=0.4,
                        macro_batch_size=16, compact=compact)
        res = calibrate(model, pruner, train, val, epochs=2, batch_size=8, val_tolerance=1.0, seed=0)
        steps = [h for h in pruner.history if h.pruned]
        out[compact] = (res, {n: m.clone() for n, m in pruner.masks.items()}, pruner.compact)
        # calibrate hands back the full-size masked model
        assert not pruner.compacted and n_params(model) == n_params(case.build())
        assert steps
    (r1, k1, c1), (r0, k0, c0) = out[None], out[False]
    assert c1 and not c0
    for a, b in zip(r0.history, r1.history):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-10 * max(1.0, abs(a["val_loss"]))
        assert a["pruned"] == b["pruned"]
    for n in k0:
        assert torch.equal(k0[n] != 0, k1[n] != 0), n
