"""Horizons beyond the model's prediction length, for every adapter family (issue 9, item 1).

Every adapter trains at min(H, p) (p = the model's prediction length: a longer target trains on its
first p steps) and forecasts any H by rolling out beyond p the way the family's own pipeline does.
Checked per family on the scaled-down random-init models of test_adapters.py:

* ``loss`` on a target of p + 1 and 2p + 3 steps equals the loss on its first p steps (bit for bit:
  the same computation) and still sends gradients to the weights;
* ``predict`` returns [B, H] for H = p, p + 1, 2p + 3, finite, and its first p steps are the
  single-pass forecast;
* the roll-out equals the family's own pipeline where it has one: ChronosBoltPipeline.predict (and
  a hand-written restatement of its quantile-expanded rollout), ChronosPipeline.predict under the
  same seed, TimesFmModelForPrediction's own decode loop (``horizon_len`` = H); PatchTST and
  TimesFM 2.5 have none in transformers, so their roll-out is checked against its definition
  (forecast appended to the context, forecast again).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from test_adapters import CASES  # the scaled-down models of every family
from tsprune.adapters import get_adapter

warnings.filterwarnings("ignore", message=".*compiled CPU extension not loaded.*")

FAMILIES = [
    "chronos-bolt", "chronos", "chronos-t5", "patchtst", "patchtst-3ch", "timesfm", "timesfm2.5",
    "chronos2", "patchtsmixer",
]
# Chronos-2 forecasts H <= p with ceil(H / patch) output patches (as Chronos2Pipeline does); its future
# patches attend to each other, so a shorter forecast is a prefix of a longer one only patch by patch
PATCH = {"chronos2": 8}


def _setup(name, seed=0):
    case = CASES[name]
    model = case.build()
    ad = get_adapter(model)
    ctx, tgt = case.inputs(torch.Generator().manual_seed(seed))
    return model, ad, ctx, tgt


def _long_target(tgt, n, seed=1):
    """[B, n] target whose first p steps are ``tgt`` and whose tail is unrelated noise."""
    g = torch.Generator().manual_seed(seed)
    tail = torch.randn(tgt.shape[0], n - tgt.shape[1], generator=g) * 5 - 3
    return torch.cat([tgt, tail], dim=-1)


def _predict(ad, model, ctx, h, seed=0):
    torch.manual_seed(seed)  # classic Chronos samples; the others ignore the seed
    return ad.predict(model, ctx, h)


@pytest.mark.parametrize("name", FAMILIES)
def test_prediction_length_is_the_models(name):
    model, ad, _, tgt = _setup(name)
    assert ad.prediction_length(model) == tgt.shape[-1]  # the cases' targets are exactly p long


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_on_long_target_is_the_loss_on_its_first_p_steps(name):
    model, ad, ctx, tgt = _setup(name)
    p = ad.prediction_length(model)
    ref = ad.loss(model, ctx, tgt)
    assert ref.ndim == 0 and torch.isfinite(ref)
    for n in (p + 1, 2 * p + 3):
        long = _long_target(tgt, n)
        got = ad.loss(model, ctx, long)
        assert torch.equal(got, ref), f"H={n}: {float(got)} != {float(ref)}"
    # the tail matters for nothing, and the weights still get gradients from a long target
    model.zero_grad()
    ad.loss(model, ctx, _long_target(tgt, 2 * p + 3)).backward()
    grads = [q.grad for q in model.parameters() if q.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("name", FAMILIES)
def test_forecast_length_for_every_horizon(name):
    model, ad, ctx, _ = _setup(name)
    p = ad.prediction_length(model)
    single = _predict(ad, model, ctx, p)
    assert single.shape == (ctx.shape[0], p) and single.dtype == ctx.dtype
    for h in (p, p + 1, 2 * p + 3):
        y = _predict(ad, model, ctx, h)
        assert y.shape == (ctx.shape[0], h), (h, tuple(y.shape))
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y[:, :p], single, atol=1e-6, rtol=0)
    short = _predict(ad, model, ctx, 3)
    ref = _predict(ad, model, ctx, PATCH[name])[:, :3] if name in PATCH else single[:, :3]
    torch.testing.assert_close(short, ref, atol=1e-6, rtol=0)


# -- roll-out == the family's own pipeline -----------------------------------------------------------
@pytest.mark.parametrize("h_extra", [1, 19])  # H = p + 1, 2p + 3
def test_chronos_bolt_rollout_is_the_pipelines(h_extra):
    from chronos.chronos_bolt import ChronosBoltPipeline

    model, ad, ctx, _ = _setup("chronos-bolt", seed=3)
    p = ad.prediction_length(model)
    h = p + h_extra
    got = ad.predict(model, ctx, h)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = ChronosBoltPipeline(model).predict(ctx, prediction_length=h)
    assert own.shape == (3, 9, h)
    torch.testing.assert_close(got, own[:, 4], atol=0, rtol=0)  # median of the pipeline's quantiles

    # the pipeline's rule, restated: every quantile of a block is appended to the context, the
    # Q x Q continuations reduce to Q empirical quantiles per step, and so on
    qs = torch.tensor(model.chronos_config.quantiles)
    n_ctx = model.chronos_config.context_length
    with torch.no_grad():
        block = model(context=ctx).quantile_preds  # [B, Q, p]
        blocks, c = [block], ctx.unsqueeze(1).expand(-1, len(qs), -1)
        while sum(b.shape[-1] for b in blocks) < h:
            c = torch.cat([c, block], dim=-1)[..., -n_ctx:]
            nxt = model(context=c.reshape(-1, c.shape[-1])).quantile_preds  # [B*Q, Q, p]
            block = torch.quantile(nxt.reshape(ctx.shape[0], -1, p), qs, dim=1).transpose(0, 1)
            blocks.append(block)
    ref = torch.cat(blocks, dim=-1)[:, 4, :h]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["chronos", "chronos-t5"])
def test_chronos_rollout_is_the_pipelines(name):
    from chronos.chronos import ChronosPipeline

    model, ad, ctx, _ = _setup(name, seed=4)
    p = ad.prediction_length(model)
    h = 2 * p + 3
    got = _predict(ad, model, ctx, h, seed=11)
    _, cfg, wrapped = ad._parts(model)
    pipe = ChronosPipeline(tokenizer=cfg.create_tokenizer(), model=wrapped)
    torch.manual_seed(11)
    own = pipe.predict(ctx, prediction_length=h)  # [B, num_samples, h]
    assert own.shape == (3, cfg.num_samples, h)
    torch.testing.assert_close(got, own.median(dim=1).values, atol=0, rtol=0)


def test_timesfm_rollout_is_its_own_decode_loop():
    """TimesFmModelForPrediction decodes ceil(horizon_len / horizon_length) output patches itself,
    appending each mean patch to the context: set its horizon_len to H and it is the reference."""
    model, ad, ctx, _ = _setup("timesfm", seed=5)
    p = ad.prediction_length(model)
    for h in (p + 1, 2 * p + 3):
        got = ad.predict(model, ctx, h)
        model.horizon_len = h
        try:
            with torch.no_grad():
                own = model(past_values=ctx, freq=[0] * ctx.shape[0]).mean_predictions
        finally:
            model.horizon_len = p
        assert own.shape == (ctx.shape[0], h)
        torch.testing.assert_close(got, own, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["patchtst", "patchtst-3ch", "timesfm2.5", "patchtsmixer"])
def test_rollout_appends_the_forecast_and_forecasts_again(name):
    """No own pipeline in transformers: step p + j is the j-th step of the forecast made from the
    context extended by the first p forecast steps (last context_length values)."""
    model, ad, ctx, _ = _setup(name, seed=6)
    p = ad.prediction_length(model)
    got = ad.predict(model, ctx, 2 * p + 3)
    y1 = ad.predict(model, ctx, p)
    c2 = torch.cat([ctx, y1], dim=-1)
    y2 = ad.predict(model, c2, p)
    y3 = ad.predict(model, torch.cat([c2, y2], dim=-1), 3)
    torch.testing.assert_close(got, torch.cat([y1, y2, y3], dim=-1), atol=1e-5, rtol=1e-5)
    assert float((y2 - y1).abs().max()) > 0  # a real second forecast, not a repeat


def test_rollout_keeps_device_dtype_and_batch_rows_independent():
    model, ad, ctx, _ = _setup("chronos-bolt", seed=7)
    h = 2 * ad.prediction_length(model) + 3
    together = ad.predict(model, ctx, h)
    alone = torch.cat([ad.predict(model, ctx[i : i + 1], h) for i in range(ctx.shape[0])])
    assert together.dtype == ctx.dtype and together.device == ctx.device
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
