"""PatchTSMixer adapter specifics (the conformance table is in test_adapters.py, cases
"patchtsmixer" and "patchtsmixer-3ch-mix").

Scaled-down random-init ``PatchTSMixerForPrediction`` (test_adapters._patchtsmixer): which MLPs and
attention carry sites, channel mixing (mode="mix_channel"), gated attention kept intact, loss and
predict through the model's own forward, and the Pruner's mask gradients against per-sample autograd
on one site.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from test_adapters import _patchtsmixer, _ts_inputs, assert_exact, n_params, ones_masks
from tsprune.adapters import get_adapter
from tsprune.masking import attach_masks, detach_masks
from tsprune.plan import repack_model

warnings.filterwarnings("ignore", message=".*compiled CPU extension not loaded.*")

L0 = "model.encoder.mlp_mixer_encoder.mixers.0"


def _point(model, ctx):
    with torch.no_grad():
        return get_adapter(model)._point(model, ctx)


def test_sites_cover_the_mixer_mlps_and_attention():
    model = _patchtsmixer(mode="mix_channel", expansion_factor=4)
    ad = get_adapter(model, block=4)
    assert ad.family == "patchtsmixer" and ad.prediction_length(model) == 16
    sites = ad.sites(model)
    # per layer: 4 attention projections + 3 MLPs x 2
    assert len(sites) == 3 * (4 + 6)
    by = {s.path: s for s in sites}
    fc1 = by[f"{L0}.patch_mixer.mlp.fc1"]
    assert fc1.kind == "ffn.patch.fc1" and fc1.layer == "mixer.0"
    assert (fc1.mask_out.units, fc1.mask_out.block) == (32 // 4, 4)  # 8 patches x expansion 4
    assert by[f"{L0}.feature_mixer.mlp.fc2"].mask_in.units == 64 // 4
    assert by[f"{L0}.channel_feature_mixer.mlp.fc1"].mask_out.units == 1  # 1 channel x 4
    q = by[f"{L0}.patch_mixer.self_attn_layer.q_proj"]
    assert (q.mask_out.units, q.mask_out.block) == (16, 1)
    # gates are not sites
    assert not any("gating_block" in p for p in by)
    plain = _patchtsmixer(self_attn=False, gated_attn=False)
    assert len(get_adapter(plain, block=4).sites(plain)) == 3 * 4


@pytest.mark.parametrize("mode", ["common_channel", "mix_channel"])
def test_repack_exact_with_gates_and_channel_mixing(mode):
    model = _patchtsmixer(mode=mode, expansion_factor=4).double()
    ad = get_adapter(model, block=4)
    sites = ad.sites(model)
    g = torch.Generator().manual_seed(31)
    masks = {}
    for k, v in ones_masks(sites, torch.float64).items():
        masks[k] = torch.where(torch.rand(v.shape, generator=g, dtype=torch.float64) < 0.4, 0.0, 1.0)
    masks[f"{L0}.patch_mixer.self_attn_layer.q_proj.out"][:8] = 0.0  # head 0: no q/k dims left
    attach_masks(model, sites, masks)
    ctx, tgt = _ts_inputs(torch.Generator().manual_seed(32))
    ctx, tgt = ctx.double(), tgt.double()
    ref = _point(model, ctx)
    new, plan = repack_model(model, ad, sites, masks)
    assert_exact(_point(new, ctx), ref)
    with torch.no_grad():
        assert_exact(ad.loss(new, ctx, tgt), ad.loss(model, ctx, tgt))
    assert n_params(new) < n_params(model)
    # gates keep their full width; their weights are untouched
    gate = f"{L0}.feature_mixer.gating_block.attn_layer"
    torch.testing.assert_close(new.get_submodule(gate).weight, model.get_submodule(gate).weight, atol=0, rtol=0)
    att = new.get_submodule(f"{L0}.patch_mixer.self_attn_layer")
    assert att.scaling == pytest.approx(8**-0.5)  # the original 1/sqrt(head_dim)
    assert att.head_dim <= 8 and plan.extra["ffn"][f"{L0}.patch_mixer.mlp"] < 32


def test_loss_and_predict_through_the_models_forward():
    model = _patchtsmixer()
    ad = get_adapter(model)
    ctx, tgt = _ts_inputs(torch.Generator().manual_seed(33))
    own = model(past_values=ctx.unsqueeze(-1), future_values=tgt.unsqueeze(-1)).loss
    torch.testing.assert_close(ad.loss(model, ctx, tgt), own, atol=0, rtol=0)
    torch.testing.assert_close(ad.loss(model, ctx, torch.cat([tgt, torch.randn(5, 9)], -1)), own, atol=0, rtol=0)
    with torch.no_grad():
        point = model(past_values=ctx.unsqueeze(-1)).prediction_outputs[..., 0]
    torch.testing.assert_close(ad.predict(model, ctx, 16), point, atol=0, rtol=0)
    longer = torch.cat([torch.randn(5, 7), ctx], dim=-1)  # only the last context_length values count
    torch.testing.assert_close(ad.predict(model, longer, 16), point, atol=0, rtol=0)
    with pytest.raises(ValueError, match="context"):
        ad.predict(model, ctx[:, :40], 8)
    multi = _patchtsmixer(num_input_channels=3)
    am = get_adapter(multi)
    together = am.predict(multi, ctx, 16)
    alone = torch.cat([am.predict(multi, ctx[i : i + 1], 16) for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    mixing = _patchtsmixer(num_input_channels=3, mode="mix_channel")
    with pytest.raises(ValueError, match="mix_channel"):
        get_adapter(mixing).predict(mixing, ctx, 16)


def test_pruner_gradients_match_per_sample_autograd_on_one_site():
    import tsprune

    model = _patchtsmixer()
    pr = tsprune.Pruner(model, criterion="taylor2", macro_batch_size=10**9)
    ctx, tgt = _ts_inputs(torch.Generator().manual_seed(34))
    for p in model.parameters():
        p.requires_grad_(False)
    pr.attach()
    pr.adapter.loss(model, ctx, tgt).backward()
    pr.detach()
    m64 = model.double()
    site = f"{L0}.patch_mixer.mlp.fc1"
    masks = {n: torch.ones_like(v, dtype=torch.float64) for n, v in pr.masks.items()}
    names = [n for n in masks if n.startswith(site + ".")]
    assert names
    for n in names:
        masks[n].requires_grad_(True)
    attach_masks(m64, pr.sites, masks)
    per = []
    for i in range(len(ctx)):
        for n in names:
            masks[n].grad = None
        pr.adapter.loss(m64, ctx[i : i + 1].double(), tgt[i : i + 1].double()).backward()
        # MSE is a mean over B x H elements: sample i's share is its own gradient / B
        per.append({n: masks[n].grad.clone() / len(ctx) for n in names})
    detach_masks(m64)
    for n in names:
        g = torch.stack([p[n] for p in per])
        scale = float(g.abs().max()) + 1e-12
        assert scale > 1e-8, n
        torch.testing.assert_close(pr.arena.grad_view(n).double(), g.sum(0), atol=2e-4 * scale, rtol=1e-3)
        torch.testing.assert_close(pr.arena.sq_view(n).double(), g.square().sum(0), atol=2e-4 * scale**2, rtol=1e-3)
