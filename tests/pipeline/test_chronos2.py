"""Chronos-2 adapter specifics (the conformance table is in test_adapters.py, case "chronos2").

Scaled-down random-init ``Chronos2Model`` (test_adapters._chronos2): RoPE pair coupling of the time
attention (a kept dim keeps its rotary partner, each pair keeps its original frequency), eager and
SDPA attention, several series in one group (group attention) through loss, predict and repack,
the roll-out beyond the prediction length against ``Chronos2Pipeline.predict``, and the Pruner's
mask gradients against per-sample autograd on one site.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from test_adapters import C2_GROUPS, CASES, _chronos2, _ts_inputs, assert_exact, n_params, ones_masks, random_masks
from tsprune.adapters import get_adapter
from tsprune.masking import attach_masks, detach_masks
from tsprune.plan import repack_model

warnings.filterwarnings("ignore", message=".*compiled CPU extension not loaded.*")

TIME = "encoder.block.0.layer.0.self_attention"  # time self-attention (RoPE)
GROUP = "encoder.block.1.layer.1.self_attention"  # group attention (no RoPE)


def _out(model, ctx, groups=C2_GROUPS):
    with torch.no_grad():
        return model(context=ctx, group_ids=groups, num_output_patches=2).quantile_preds


def test_sites_and_family():
    model = _chronos2()
    ad = get_adapter(model, block=4)
    assert ad.family == "chronos2" and ad.prediction_length(model) == 16
    sites = ad.sites(model)
    assert len(sites) == 2 * (4 + 4 + 2)  # per block: time attention, group attention, FFN
    kinds = {s.kind for s in sites}
    assert kinds == {f"{a}.{n}" for a in ("time_attn", "group_attn") for n in "qkvo"} | {"ffn.wi", "ffn.wo"}
    q = next(s for s in sites if s.path == f"{TIME}.q")
    assert (q.mask_out.units, q.mask_out.block) == (32, 1) and q.residual_in and q.layer == "encoder.0"
    wi = next(s for s in sites if s.kind == "ffn.wi")
    assert (wi.mask_out.units, wi.mask_out.block) == (16, 4)
    hs = get_adapter(model, heads=True, block=4).sites(model)
    q = next(s for s in hs if s.path == f"{TIME}.q")
    assert (q.mask_out.units, q.mask_out.block) == (4, 8)


def test_rope_pairs_are_coupled_and_keep_their_frequency():
    """d_kv 8: pairs (0,4) (1,5) (2,6) (3,7). Head 0: q dim 1 gone but its partner 5 alive -> pair 1
    kept whole; both q dims of pair 2 gone -> pair 2 removed; head 1: both k dims of pair 0 and 3 gone
    -> removed; head 2: only pair 3 left; head 3 all pairs. Uniform 4 pairs, padded with dead ones."""
    model = _chronos2().double()
    ad = get_adapter(model, block=4)
    sites = ad.sites(model)
    masks = ones_masks(sites, torch.float64)
    q = masks[f"{TIME}.q.out"]
    k = masks[f"{TIME}.k.out"]
    q[[0 * 8 + 1, 0 * 8 + 2, 0 * 8 + 6]] = 0.0
    k[[1 * 8 + 0, 1 * 8 + 4, 1 * 8 + 3, 1 * 8 + 7]] = 0.0
    q[[2 * 8 + d for d in (0, 1, 2, 4, 5, 6)]] = 0.0
    q[3 * 8 + 5] = 0.5  # a non-binary value is folded, not a removal
    attach_masks(model, sites, masks)
    ctx, _ = _ts_inputs(torch.Generator().manual_seed(1))
    ctx = ctx.double()
    ref = _out(model, ctx)
    new, plan = repack_model(model, ad, sites, masks)
    att = new.get_submodule(TIME)
    assert (att.n_heads, att.kv_proj_dim, att.v_head_dim) == (4, 8, 8)  # head 3 keeps all 4 pairs
    pairs = plan.extra["rope_pairs"][TIME]
    assert pairs[0] == [0, 1, 2, 3] and pairs[3] == [0, 1, 2, 3]  # head 0 pads with its dead pair 2
    assert pairs[1] == [0, 1, 2, 3] and pairs[2] == [0, 1, 2, 3]
    inv = model.get_submodule(TIME).rope_embed.inv_freq.float()
    torch.testing.assert_close(att.rope_inv_freq, inv[torch.tensor(pairs)], atol=0, rtol=0)
    assert_exact(_out(new, ctx), ref)
    detach_masks(model)

    # without head 3 the layer needs only 3 pairs: each head its own, with its own frequencies
    model = _chronos2().double()
    sites = ad.sites(model)
    masks = ones_masks(sites, torch.float64)
    q, k = masks[f"{TIME}.q.out"], masks[f"{TIME}.k.out"]
    q[[1, 2, 6]] = 0.0  # head 0: pair 2 gone, pair 1 kept (dim 5 alive)
    k[[8 + 0, 8 + 4, 8 + 3, 8 + 7]] = 0.0  # head 1: pairs 0 and 3 gone
    q[[16 + d for d in (0, 1, 2, 4, 5, 6)]] = 0.0  # head 2: pair 3 only
    masks[f"{TIME}.v.out"][24:32] = 0.0  # head 3 removed
    attach_masks(model, sites, masks)
    ref = _out(model, ctx)
    new, plan = repack_model(model, ad, sites, masks)
    att = new.get_submodule(TIME)
    assert (att.n_heads, att.kv_proj_dim, att.v_head_dim) == (3, 6, 8)
    pairs = plan.extra["rope_pairs"][TIME]
    assert pairs[0] == [0, 1, 3] and pairs[1] == [0, 1, 2] and sorted(pairs[2])[-1] == 3 and 3 in pairs[2]
    # kept q rows: first halves then second halves of the kept pairs, per head
    rows = plan.keep[f"{TIME}.q.weight"]["rows"]
    assert rows[:6] == [0, 1, 3, 4, 5, 7] and rows[6:12] == [8, 9, 10, 12, 13, 14]
    torch.testing.assert_close(att.rope_inv_freq, inv[torch.tensor(pairs)], atol=0, rtol=0)
    assert_exact(_out(new, ctx), ref)
    assert n_params(new) < n_params(model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_repack_exact_with_either_attention(attn):
    case = CASES["chronos2"]
    model = _chronos2(attn_implementation=attn).double()
    ad = get_adapter(model, block=4)
    sites = ad.sites(model)
    masks = random_masks(sites, torch.Generator().manual_seed(21), case, torch.float64)
    attach_masks(model, sites, masks)
    ctx, tgt = _ts_inputs(torch.Generator().manual_seed(22))
    ctx, tgt = ctx.double(), tgt.double()
    ref = _out(model, ctx)
    new, _ = repack_model(model, ad, sites, masks)
    assert new.config._attn_implementation == attn
    assert_exact(_out(new, ctx), ref)
    with torch.no_grad():
        assert_exact(ad.loss(new, ctx, tgt, group_ids=C2_GROUPS), ad.loss(model, ctx, tgt, group_ids=C2_GROUPS))
    # the other implementation computes the same repacked model
    new.config._attn_implementation = "sdpa" if attn == "eager" else "eager"
    assert_exact(_out(new, ctx), ref)


def test_loss_and_predict_through_the_models_forward():
    model = _chronos2()
    ad = get_adapter(model)
    ctx, tgt = _ts_inputs(torch.Generator().manual_seed(3))
    own = model(context=ctx, num_output_patches=2, future_target=tgt).loss
    torch.testing.assert_close(ad.loss(model, ctx, tgt), own, atol=0, rtol=0)
    grouped = model(context=ctx, group_ids=C2_GROUPS, num_output_patches=2, future_target=tgt).loss
    torch.testing.assert_close(ad.loss(model, ctx, tgt, group_ids=C2_GROUPS), grouped, atol=0, rtol=0)
    assert float((grouped - own).abs().detach()) > 1e-6  # group attention mixes the series of a group
    short = model(context=ctx, num_output_patches=1, future_target=tgt[:, :5]).loss  # one patch suffices
    torch.testing.assert_close(ad.loss(model, ctx, tgt[:, :5]), short, atol=0, rtol=0)
    with torch.no_grad():
        q = model(context=ctx, group_ids=C2_GROUPS, num_output_patches=2).quantile_preds
    mi = model.chronos_config.quantiles.index(0.5)
    torch.testing.assert_close(ad.predict(model, ctx, 16, group_ids=C2_GROUPS), q[:, mi], atol=0, rtol=0)
    # H <= p uses ceil(H / patch) output patches, as the pipeline does (the future patches attend to
    # each other, so a 1-patch forecast is not the first patch of a 2-patch one)
    with torch.no_grad():
        q1 = model(context=ctx, group_ids=C2_GROUPS, num_output_patches=1).quantile_preds
    torch.testing.assert_close(ad.predict(model, ctx, 5, group_ids=C2_GROUPS), q1[:, mi, :5], atol=0, rtol=0)
    with pytest.raises(ValueError, match="group_ids"):
        ad.predict(model, ctx, 5, group_ids=torch.zeros(3, dtype=torch.long))


def test_groups_are_joint_and_separate():
    """Series of one group influence each other; series of different groups do not."""
    model = _chronos2()
    ad = get_adapter(model)
    ctx, _ = _ts_inputs(torch.Generator().manual_seed(4))
    base = ad.predict(model, ctx, 16, group_ids=C2_GROUPS)
    bumped = ctx.clone()
    bumped[0] = torch.randn(64, generator=torch.Generator().manual_seed(9)).cumsum(0)  # a new series 0 (group 0)
    after = ad.predict(model, bumped, 16, group_ids=C2_GROUPS)
    assert float((after[1] - base[1]).abs().max()) > 1e-5  # its group partner moves
    torch.testing.assert_close(after[2:], base[2:], atol=1e-6, rtol=1e-6)  # the other group does not
    alone = ad.predict(model, ctx, 16)
    assert float((alone - base).abs().max()) > 1e-5


@pytest.mark.parametrize("grouped", [False, True])
def test_rollout_beyond_prediction_length_is_the_pipelines(grouped):
    from chronos.chronos2 import Chronos2Pipeline

    model = _chronos2()
    ad = get_adapter(model)
    ctx, _ = _ts_inputs(torch.Generator().manual_seed(5))
    h = 2 * ad.prediction_length(model) + 3
    mi = model.chronos_config.quantiles.index(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if grouped:  # one multivariate task per group: the pipeline's own grouping
            got = ad.predict(model, ctx, h, group_ids=C2_GROUPS)
            own = Chronos2Pipeline(model).predict([ctx[:2], ctx[2:]], prediction_length=h)
        else:
            got = ad.predict(model, ctx, h)
            own = Chronos2Pipeline(model).predict(ctx.unsqueeze(1), prediction_length=h)
    own = torch.cat([o[:, mi] for o in own])
    assert got.shape == own.shape == (5, h)
    torch.testing.assert_close(got, own, atol=1e-5, rtol=1e-5)


def test_pruner_gradients_match_per_sample_autograd_on_one_site():
    """Pruner (arena, masked_linear kernels) vs plain float64 autograd, one sample at a time, on the
    time attention's q site; series are independent (default groups), so the batch-mean loss
    splits into per-sample shares."""
    import tsprune

    model = _chronos2()
    pr = tsprune.Pruner(model, criterion="taylor2", macro_batch_size=10**9)
    ctx, tgt = _ts_inputs(torch.Generator().manual_seed(6))
    for p in model.parameters():
        p.requires_grad_(False)
    pr.attach()
    pr.adapter.loss(model, ctx, tgt).backward()
    pr.detach()
    m64 = model.double()
    site = f"{TIME}.q"
    masks = {n: torch.ones_like(v, dtype=torch.float64) for n, v in pr.masks.items()}
    for side in ("in", "out"):
        if f"{site}.{side}" in masks:
            masks[f"{site}.{side}"].requires_grad_(True)
    names = [n for n, v in masks.items() if v.requires_grad]
    assert names
    attach_masks(m64, pr.sites, masks)
    per = []
    for i in range(len(ctx)):
        for n in names:
            masks[n].grad = None
        pr.adapter.loss(m64, ctx[i : i + 1].double(), tgt[i : i + 1].double()).backward()
        per.append({n: masks[n].grad.clone() / len(ctx) for n in names})
    detach_masks(m64)
    for n in names:
        g = torch.stack([p[n] for p in per])
        scale = float(g.abs().max()) + 1e-12
        assert scale > 1e-8, n
        torch.testing.assert_close(pr.arena.grad_view(n).double(), g.sum(0), atol=2e-4 * scale, rtol=1e-3)
        torch.testing.assert_close(pr.arena.sq_view(n).double(), g.square().sum(0), atol=2e-4 * scale**2, rtol=1e-3)
