"""Model-family adapters: sites, masked forward, coupled plan, physical repack, reload.

Every family is built from a scaled-down config (random init, no hub access) and checked for:
(a) all-ones masks change nothing; (b) random masks (~40% zeros, some non-binary values, one layer
with every head removed, one FFN removed), at head-dim and whole-head granularity: the repacked model
computes the masked output (fp32 and float64) with strictly fewer parameters, and reloads from its
JSON plan; (c) repack leaves the original model as it was; (d) masks get gradients through the
adapter's loss.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

from tsprune.adapters import Plan, ZeroLinear, get_adapter
from tsprune.masking import attach_masks, detach_masks, is_masked
from tsprune.plan import load_exact, repack_model

warnings.filterwarnings("ignore", message=".*compiled CPU extension not loaded.*")


# -- model cases ------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]  # fp32, eval mode, seeded
    inputs: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # context, target (fp32)
    output: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # deterministic output to compare
    kill_heads: str  # a mask whose zeroing removes every head of one layer
    kill_ffn: str  # a mask whose zeroing removes one whole FFN
    block: int = 4  # FFN block of the adapter in these tests
    loss_kw: dict = field(default_factory=dict)  # extra keyword arguments of adapter.loss


def _chronos_bolt() -> nn.Module:
    from chronos.chronos_bolt import ChronosBoltModelForForecasting
    from transformers import T5Config

    torch.manual_seed(0)
    cfg = T5Config(
        d_model=64, d_kv=16, num_heads=2, d_ff=128, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="relu", vocab_size=2, decoder_start_token_id=0, pad_token_id=0,
        initializer_factor=0.5,
        chronos_config=dict(
            context_length=64, prediction_length=16, input_patch_size=16, input_patch_stride=16,
            quantiles=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], use_reg_token=True,
        ),
    )
    return ChronosBoltModelForForecasting(cfg).eval()


def _chronos_classic(bare: bool = False) -> nn.Module:
    """Classic Chronos: a ChronosModel wrapper, or (bare) the T5ForConditionalGeneration of a Chronos
    checkpoint, whose config carries ``chronos_config`` (what tsprune.models loads from disk)."""
    from chronos.chronos import ChronosConfig, ChronosModel
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cc = dict(
        tokenizer_class="MeanScaleUniformBins", tokenizer_kwargs={"low_limit": -15.0, "high_limit": 15.0},
        context_length=48, prediction_length=8, n_tokens=96, n_special_tokens=2, pad_token_id=0,
        eos_token_id=1, use_eos_token=True, model_type="seq2seq", num_samples=4, temperature=1.0,
        top_k=50, top_p=1.0,
    )
    cfg = T5Config(
        d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", vocab_size=96, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, initializer_factor=0.5, **({"chronos_config": cc} if bare else {}),
    )
    t5 = T5ForConditionalGeneration(cfg).eval()
    return t5 if bare else ChronosModel(ChronosConfig(**cc), t5).eval()


def _t5_of(model):
    from transformers import T5ForConditionalGeneration

    return model if isinstance(model, T5ForConditionalGeneration) else model.model


def _bolt_inputs(g):
    return torch.randn(3, 64, generator=g) * 2 + 1, torch.randn(3, 16, generator=g) * 2 + 1


def _classic_inputs(g):
    return torch.randn(3, 48, generator=g) * 2 + 1, torch.randn(3, 8, generator=g) * 2 + 1


@torch.no_grad()
def _bolt_output(model, context):
    return model(context=context).quantile_preds


@torch.no_grad()
def _classic_output(model, context):
    """Teacher-forced logits over a fixed decoder sequence (encoder, decoder self/cross-attention)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 96, (context.shape[0], context.shape[1]), generator=g)
    dec = torch.randint(2, 96, (context.shape[0], 5), generator=g)
    return _t5_of(model)(input_ids=ids, decoder_input_ids=dec).logits


def _patchtst(**kw) -> nn.Module:
    from transformers import PatchTSTConfig, PatchTSTForPrediction

    torch.manual_seed(0)
    # published ETTh1 shape (d_model 128, 16 heads, ffn 256, 3 layers, patch 16 / stride 8), scaled down
    cfg = dict(
        num_input_channels=1, context_length=64, patch_length=8, patch_stride=4, prediction_length=16,
        d_model=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=3, norm_type="batchnorm",
        scaling="std", init_std=0.1,  # a larger init than 0.02 so that the encoder matters
    )
    cfg.update(kw)
    return PatchTSTForPrediction(PatchTSTConfig(**cfg)).eval()


def _patchtst_multi() -> nn.Module:
    return _patchtst(num_input_channels=3, norm_type="layernorm", pre_norm=False, activation_function="relu")


def _ts_inputs(g):
    return torch.randn(5, 64, generator=g) * 2 + 1, torch.randn(5, 16, generator=g) * 2 + 1


@torch.no_grad()
def _patchtst_output(model, context):
    return get_adapter(model)._point(model, context)


def _timesfm() -> nn.Module:
    from transformers import TimesFmConfig, TimesFmModelForPrediction

    torch.manual_seed(0)
    # TimesFM 2.0-500m shape (hidden 1280, 16 heads of 80, ffn 1280, 50 layers, patch 32, horizon 128), scaled down
    cfg = TimesFmConfig(
        patch_length=8, context_length=64, horizon_length=16, num_hidden_layers=3, hidden_size=64,
        intermediate_size=64, head_dim=16, num_attention_heads=4, initializer_range=0.1,
    )
    return TimesFmModelForPrediction(cfg).eval()


def _timesfm25(**kw) -> nn.Module:
    from transformers import TimesFm2_5Config, TimesFm2_5ModelForPrediction

    torch.manual_seed(0)
    # TimesFM 2.5-200m shape (hidden 1280, 16 heads of 80, ffn 1280, 20 layers, patch 32), scaled down
    cfg = dict(
        patch_length=8, context_length=64, horizon_length=16, num_hidden_layers=3, hidden_size=64,
        intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=4,
        output_quantile_len=32, max_position_embeddings=64, initializer_range=0.1,
    )
    cfg.update(kw)
    return TimesFm2_5ModelForPrediction(TimesFm2_5Config(**cfg)).eval()


def _timesfm_output(model, context):
    return get_adapter(model).predict(model, context, 16)


def _chronos2(**kw) -> nn.Module:
    from chronos.chronos2 import Chronos2CoreConfig, Chronos2Model

    torch.manual_seed(0)
    # chronos-2 (120M) shape (d_model 768, 12 heads of 64, d_ff 3072, 12 layers, patch 16, 21 quantiles,
    # REG token, arcsinh), scaled down; SDPA attention, the model's default (eager: test_chronos2.py)
    cc = dict(
        context_length=64, input_patch_size=8, input_patch_stride=8, output_patch_size=8, max_output_patches=2,
        quantiles=[0.01, 0.05] + [round(0.1 * i, 1) for i in range(1, 10)] + [0.95, 0.99],
        use_reg_token=True, use_arcsinh=True,
    )
    cfg = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, dropout_rate=0.0,
               initializer_factor=0.3, attn_implementation="sdpa", chronos_config=cc)
    cfg.update(kw)
    return Chronos2Model(Chronos2CoreConfig(**cfg)).eval()


# two groups of series: group attention mixes series 0-1 and 2-4
C2_GROUPS = torch.tensor([0, 0, 1, 1, 1])


@torch.no_grad()
def _chronos2_output(model, context):
    return model(context=context, group_ids=C2_GROUPS, num_output_patches=2).quantile_preds


def _patchtsmixer(**kw) -> nn.Module:
    from transformers import PatchTSMixerConfig, PatchTSMixerForPrediction

    torch.manual_seed(0)
    # TTM / PatchTSMixer shape (context 512, patch 64, d_model 3 x patch, expansion 2, gated attention,
    # common_channel), scaled down; with the optional patch self-attention and a larger init
    cfg = dict(
        context_length=64, patch_length=8, patch_stride=8, prediction_length=16, num_input_channels=1,
        d_model=16, expansion_factor=2, num_layers=3, dropout=0.0, head_dropout=0.0, gated_attn=True,
        self_attn=True, self_attn_heads=2, mode="common_channel", scaling="std", norm_mlp="LayerNorm",
        init_std=0.2,
    )
    cfg.update(kw)
    return PatchTSMixerForPrediction(PatchTSMixerConfig(**cfg)).eval()


@torch.no_grad()
def _mixer_output(model, context):
    return get_adapter(model)._point(model, context)


CASES = {
    "chronos-bolt": Case(
        "chronos-bolt", _chronos_bolt, _bolt_inputs, _bolt_output,
        kill_heads="encoder.block.1.layer.0.SelfAttention.v.out",
        kill_ffn="decoder.block.0.layer.2.DenseReluDense.wi.out",
    ),
    "chronos": Case(
        "chronos", _chronos_classic, _classic_inputs, _classic_output,
        kill_heads="model.decoder.block.1.layer.1.EncDecAttention.o.in",
        kill_ffn="model.encoder.block.0.layer.1.DenseReluDense.wi_1.out",
    ),
    "chronos-t5": Case(
        "chronos-t5", lambda: _chronos_classic(bare=True), _classic_inputs, _classic_output,
        kill_heads="encoder.block.0.layer.0.SelfAttention.v.in",  # v has no live input: every head goes
        kill_ffn="decoder.block.1.layer.2.DenseReluDense.wo.in",
    ),
    "patchtst": Case(
        "patchtst", _patchtst, _ts_inputs, _patchtst_output,
        kill_heads="model.encoder.layers.1.self_attn.v_proj.out",
        kill_ffn="model.encoder.layers.2.ff.0.out",
    ),
    "patchtst-3ch": Case(
        "patchtst-3ch", _patchtst_multi, _ts_inputs, _patchtst_output,
        kill_heads="model.encoder.layers.0.self_attn.out_proj.in",
        kill_ffn="model.encoder.layers.1.ff.3.in",
    ),
    "timesfm": Case(
        "timesfm", _timesfm, _ts_inputs, _timesfm_output,
        kill_heads="decoder.layers.1.self_attn.v_proj.out",
        kill_ffn="decoder.layers.2.mlp.gate_proj.out",
    ),
    "timesfm2.5": Case(
        "timesfm2.5", _timesfm25, _ts_inputs, _timesfm_output,
        kill_heads="model.layers.0.self_attn.o_proj.in",
        kill_ffn="model.layers.1.mlp.fc2.in",
    ),
    "chronos2": Case(
        "chronos2", _chronos2, _ts_inputs, _chronos2_output,
        kill_heads="encoder.block.1.layer.1.self_attention.v.out",
        kill_ffn="encoder.block.0.layer.2.mlp.wo.in",
        loss_kw={"group_ids": C2_GROUPS},  # without groups, group attention's q/k get no gradient
    ),
    "patchtsmixer": Case(
        "patchtsmixer", _patchtsmixer, _ts_inputs, _mixer_output,
        kill_heads="model.encoder.mlp_mixer_encoder.mixers.1.patch_mixer.self_attn_layer.v_proj.out",
        kill_ffn="model.encoder.mlp_mixer_encoder.mixers.2.feature_mixer.mlp.fc2.in",
    ),
    "patchtsmixer-3ch-mix": Case(  # 3 packed channels, channel-independent; channel mixing below
        "patchtsmixer-3ch-mix", lambda: _patchtsmixer(num_input_channels=3, expansion_factor=4, norm_mlp="BatchNorm"),
        _ts_inputs, _mixer_output,
        kill_heads="model.encoder.mlp_mixer_encoder.mixers.0.patch_mixer.self_attn_layer.out_proj.in",
        kill_ffn="model.encoder.mlp_mixer_encoder.mixers.1.patch_mixer.mlp.fc1.out",
    ),
}


# -- helpers ----------------------------------------------------------------------------------------
def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied tensors once


def ones_masks(sites, dtype=torch.float32):
    masks = {}
    for s in sites:
        for side, spec in (("in", s.mask_in), ("out", s.mask_out)):
            if spec is not None:
                masks[s.mask_name(side)] = torch.ones(spec.units, dtype=dtype)
    return masks


def random_masks(sites, g, case: Case, dtype=torch.float32):
    """~40% zeros on pruned axes (~10% on residual sides), ~15% non-binary values in (0.25, 1.5)."""
    masks = {}
    for s in sites:
        for side, spec in (("in", s.mask_in), ("out", s.mask_out)):
            if spec is None:
                continue
            residual = s.residual_in if side == "in" else s.residual_out
            p0 = 0.1 if residual else 0.4
            m = (torch.rand(spec.units, generator=g) >= p0).to(torch.float64)
            odd = torch.rand(spec.units, generator=g) < 0.15
            vals = 0.25 + 1.25 * torch.rand(spec.units, generator=g, dtype=torch.float64)
            masks[s.mask_name(side)] = torch.where(odd & (m > 0), vals, m).to(dtype)
    for name in (case.kill_heads, case.kill_ffn):
        assert name in masks, name
        masks[name].zero_()
    return masks


def assert_exact(got, ref):
    """Repacked vs masked: max abs difference <= 1e-5 (fp32; 1e-10 in float64) times the output's
    scale max(1, max|ref|), compared in float64."""
    tol = (1e-5 if ref.dtype != torch.float64 else 1e-10) * max(1.0, float(ref.detach().abs().max()))
    diff = float((got.detach().double() - ref.detach().double()).abs().max())
    assert diff <= tol, f"max abs difference {diff:.3g} > {tol:.3g}"


def _forward(case, model, context):
    with torch.no_grad():
        return case.output(model, context)


# -- (a) all-ones masks -----------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_ones_masks_change_nothing(name, heads):
    case = CASES[name]
    model = case.build()
    ad = get_adapter(model, heads=heads, block=case.block)
    sites = ad.sites(model)
    assert sites and all(isinstance(model.get_submodule(s.path), nn.Linear) for s in sites)
    ctx, _ = case.inputs(torch.Generator().manual_seed(11))
    ref = _forward(case, model, ctx)
    attach_masks(model, sites, ones_masks(sites))
    assert is_masked(model)
    got = _forward(case, model, ctx)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


# -- (b) random masks -> repack == masked ---------------------------------------------------------
def _check_repack(case, heads, dtype, seed):
    model = case.build().to(dtype)
    ad = get_adapter(model, heads=heads, block=case.block)
    sites = ad.sites(model)
    masks = random_masks(sites, torch.Generator().manual_seed(seed), case, dtype)
    ctx, tgt = case.inputs(torch.Generator().manual_seed(seed + 1))
    ctx, tgt = ctx.to(dtype), tgt.to(dtype)
    unmasked = _forward(case, model, ctx)
    attach_masks(model, sites, masks)
    ref = _forward(case, model, ctx)
    assert (ref - unmasked).abs().max() > 1e-3, "masks should change the output"
    new, plan = repack_model(model, ad, sites, masks)
    assert not is_masked(new)
    assert_exact(_forward(case, new, ctx), ref)
    with torch.no_grad():
        assert_exact(ad.loss(new, ctx, tgt, **case.loss_kw), ad.loss(model, ctx, tgt, **case.loss_kw))
    assert n_params(new) < n_params(model)
    return model, new, plan, ad, masks, ctx


@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_repack_matches_masked_fp32(name, heads):
    _, new, plan, _, _, _ = _check_repack(CASES[name], heads, torch.float32, seed=100 + heads)
    # the killed layer lost every head, the killed FFN every channel; both became ZeroLinears
    case = CASES[name]
    att = case.kill_heads.rsplit(".", 2)[0]
    assert plan.extra["heads"][att] == []
    projections = [k for k in plan.linears if k.rsplit(".", 1)[0] == att]
    assert len(projections) == 4
    for key in projections:
        assert plan.linears[key]["zero"]
        assert isinstance(new.get_submodule(key), ZeroLinear)
    ffn = case.kill_ffn.rsplit(".", 2)[0]
    zeros = [k for k in plan.linears if k.startswith(ffn + ".")]
    assert zeros and all(plan.linears[k]["zero"] for k in zeros)


@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_repack_matches_masked_fp64(name, heads):
    _check_repack(CASES[name], heads, torch.float64, seed=200 + heads)


@pytest.mark.parametrize("name", list(CASES))
def test_plan_reloads_into_fresh_model(name):
    """apply_plan(JSON plan) on a freshly built model + the repacked state dict == repacked model."""
    case = CASES[name]
    _, new, plan, ad, _, ctx = _check_repack(case, False, torch.float32, seed=300)
    plan2 = Plan.from_json(json.loads(json.dumps(plan.to_json(with_keep=False))))
    fresh = case.build()
    ad.apply_plan(fresh, plan2)
    load_exact(fresh, new.state_dict())
    torch.testing.assert_close(_forward(case, fresh, ctx), _forward(case, new, ctx), atol=0, rtol=0)
    assert n_params(fresh) == n_params(new)


# -- (c) the original is untouched -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_repack_leaves_original_unchanged(name):
    case = CASES[name]
    model = case.build()
    ad = get_adapter(model, heads=False, block=case.block)
    sites = ad.sites(model)
    masks = random_masks(sites, torch.Generator().manual_seed(5), case)
    attach_masks(model, sites, masks)
    ctx, _ = case.inputs(torch.Generator().manual_seed(6))
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before_types = {n: type(m) for n, m in model.named_modules()}
    before_masks = {k: v.clone() for k, v in masks.items()}
    before_out = _forward(case, model, ctx)
    repack_model(model, ad, sites, masks)
    after_sd = model.state_dict()
    assert before_sd.keys() == after_sd.keys()
    for k, v in before_sd.items():
        assert torch.equal(v, after_sd[k]), k
    assert {n: type(m) for n, m in model.named_modules()} == before_types
    assert all(torch.equal(before_masks[k], masks[k]) for k in masks)
    assert is_masked(model)
    torch.testing.assert_close(_forward(case, model, ctx), before_out, atol=0, rtol=0)
    detach_masks(model)


# -- (d) gradients reach the masks ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_masks_get_gradients_through_loss(name):
    case = CASES[name]
    model = case.build()
    for p in model.parameters():
        p.requires_grad_(False)
    ad = get_adapter(model, heads=False, block=case.block)
    sites = ad.sites(model)
    masks = {k: v.requires_grad_(True) for k, v in ones_masks(sites).items()}
    attach_masks(model, sites, masks)
    ctx, tgt = case.inputs(torch.Generator().manual_seed(8))
    loss = ad.loss(model, ctx, tgt, **case.loss_kw)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    nonzero = 0
    for k, m in masks.items():
        assert m.grad is not None, k
        assert torch.isfinite(m.grad).all(), k
        nonzero += bool(m.grad.abs().sum() > 0)
    assert nonzero >= 0.9 * len(masks)


# -- family specifics -------------------------------------------------------------------------------
def test_t5_sites_and_specs():
    model = _chronos_bolt()
    ad = get_adapter(model, heads=False, block=4)
    assert ad.family == "chronos-bolt"
    sites = ad.sites(model)
    # 2 enc blocks x (4 attn + 2 ffn) + 2 dec blocks x (8 attn + 2 ffn)
    assert len(sites) == 2 * 6 + 2 * 10
    q = next(s for s in sites if s.path == "encoder.block.0.layer.0.SelfAttention.q")
    assert (q.mask_out.units, q.mask_out.block) == (32, 1) and q.residual_in and q.mask_in.block == 4
    o = next(s for s in sites if s.path == "decoder.block.1.layer.1.EncDecAttention.o")
    assert o.kind == "cross_attn.o" and o.layer == "decoder.1" and o.residual_out
    wi = next(s for s in sites if s.kind == "ffn.wi")
    assert (wi.mask_out.units, wi.mask_out.block) == (32, 4)
    hs = get_adapter(model, heads=True, block={"ffn": 8}).sites(model)
    q = next(s for s in hs if s.path == "encoder.block.0.layer.0.SelfAttention.q")
    assert (q.mask_out.units, q.mask_out.block) == (2, 16)
    wo = next(s for s in hs if s.kind == "ffn.wo")
    assert (wo.mask_in.units, wo.mask_in.block) == (16, 8)


def test_t5_per_layer_relative_bias_heads():
    """Block 0 keeps head 1 only, block 1 head 0 only: each must get its own bias column."""
    model = _chronos_bolt().double()
    ad = get_adapter(model, heads=True, block=4)
    sites = ad.sites(model)
    masks = ones_masks(sites, torch.float64)
    masks["encoder.block.0.layer.0.SelfAttention.v.out"] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    masks["encoder.block.1.layer.0.SelfAttention.o.in"] = torch.tensor([0.7, 0.0], dtype=torch.float64)
    masks["decoder.block.0.layer.0.SelfAttention.q.out"] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    attach_masks(model, sites, masks)
    ctx, _ = _bolt_inputs(torch.Generator().manual_seed(3))
    ctx = ctx.double()
    ref = _bolt_output(model, ctx)
    new, plan = repack_model(model, ad, sites, masks)
    assert plan.extra["heads"]["encoder.block.0.layer.0.SelfAttention"] == [1]
    assert plan.extra["heads"]["encoder.block.1.layer.0.SelfAttention"] == [0]
    assert plan.extra["bias_tables"]["encoder.block.0.layer.0.SelfAttention"] == [0, 1]
    assert plan.extra["bias_heads"]["encoder.block.0.layer.0.SelfAttention"] == [1]
    assert plan.extra["bias_heads"]["encoder.block.1.layer.0.SelfAttention"] == [0]
    # decoder block 0 head 0 has no q/k dims left but keeps its v/o: scores = bias only
    dec = new.get_submodule("decoder.block.0.layer.0.SelfAttention")
    assert dec.n_heads == 2 and dec.key_value_proj_dim == 16 and dec.v_head_dim == 16
    assert_exact(_bolt_output(new, ctx), ref)


def test_t5_shared_embedding_stays_tied():
    case = CASES["chronos-bolt"]
    _, new, _, _, _, _ = _check_repack(case, False, torch.float32, seed=400)
    assert new.encoder.embed_tokens.weight is new.shared.weight
    assert new.decoder.embed_tokens.weight is new.shared.weight
    for name in ("chronos", "chronos-t5"):
        _, new, _, _, _, _ = _check_repack(CASES[name], True, torch.float32, seed=401)
        assert _t5_of(new).lm_head.weight is _t5_of(new).shared.weight


def test_t5_qk_and_vo_dims_are_separate():
    model = _chronos_bolt()
    ad = get_adapter(model, heads=False, block=4)
    sites = ad.sites(model)
    masks = ones_masks(sites)
    ap = "encoder.block.0.layer.0.SelfAttention"
    masks[f"{ap}.k.out"][torch.arange(32) % 16 >= 4] = 0  # 4 q/k dims per head
    masks[f"{ap}.v.out"][torch.arange(32) % 16 >= 10] = 0  # 10 v/o dims per head
    masks[f"{ap}.q.out"][0] = 0  # head 0 keeps 3 q/k dims, head 1 keeps 4: uniform 4
    attach_masks(model, sites, masks)
    ctx, _ = _bolt_inputs(torch.Generator().manual_seed(4))
    ref = _bolt_output(model, ctx)
    new, plan = repack_model(model, ad, sites, masks)
    att = new.get_submodule(ap)
    assert (att.n_heads, att.key_value_proj_dim, att.v_head_dim) == (2, 4, 10)
    assert att.q.out_features == att.k.out_features == 8 and att.v.out_features == att.o.in_features == 20
    assert_exact(_bolt_output(new, ctx), ref)


def test_chronos_bolt_loss_and_predict():
    model = _chronos_bolt()
    ad = get_adapter(model)
    ctx, tgt = _bolt_inputs(torch.Generator().manual_seed(9))
    torch.testing.assert_close(ad.loss(model, ctx, tgt), model(context=ctx, target=tgt).loss)
    # a target beyond prediction_length trains on its first 16 steps (test_horizons.py)
    torch.testing.assert_close(ad.loss(model, ctx, torch.cat([tgt, torch.randn(3, 1)], -1)), ad.loss(model, ctx, tgt))
    p = ad.predict(model, ctx, 10)
    assert p.shape == (3, 10)
    torch.testing.assert_close(p, model(context=ctx).quantile_preds[:, 4, :10])
    long = ad.predict(model, ctx, 40)  # autoregressive rollout beyond prediction_length 16
    assert long.shape == (3, 40) and torch.isfinite(long).all()
    torch.testing.assert_close(long[:, :16], model(context=ctx).quantile_preds[:, 4])


@pytest.mark.parametrize("name", ["chronos", "chronos-t5"])
def test_chronos_classic_cached_decoding_after_repack(name):
    """Generation path (KV cache, cross-attention cache reuse) of a repacked classic Chronos."""
    case = CASES[name]
    model, new, _, ad, _, ctx = _check_repack(case, False, torch.float32, seed=500)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 96, (2, 12), generator=g)

    def run(m):
        m = _t5_of(m)
        enc = m.get_encoder()(input_ids=ids)
        nxt, cache, logits = torch.zeros(2, 1, dtype=torch.long), None, []
        for _ in range(3):
            out = m(encoder_outputs=enc, decoder_input_ids=nxt, cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
            logits.append(out.logits)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return torch.cat(logits, 1)

    with torch.no_grad():
        assert_exact(run(new), run(model))
        torch.manual_seed(0)
        p = ad.predict(new, ctx, 12)
    assert p.shape == (3, 12) and torch.isfinite(p).all()


def test_patchtst_keeps_original_scale_and_separate_dims():
    model = _patchtst()
    ad = get_adapter(model, heads=False, block=4)
    assert ad.family == "patchtst"
    sites = ad.sites(model)
    assert len(sites) == 3 * 6
    masks = ones_masks(sites)
    ap = "model.encoder.layers.0.self_attn"
    masks[f"{ap}.q_proj.out"][torch.arange(32) % 8 >= 3] = 0  # 3 q/k dims per head
    masks[f"{ap}.v_proj.out"][torch.arange(32) % 8 >= 5] = 0  # 5 v/o dims per head
    masks[f"{ap}.out_proj.in"][8:16] = 0  # head 1 removed
    attach_masks(model, sites, masks)
    ctx, tgt = _ts_inputs(torch.Generator().manual_seed(12))
    ref = _patchtst_output(model, ctx)
    new, plan = repack_model(model, ad, sites, masks)
    att = new.get_submodule(ap)
    assert (att.num_heads, att.head_dim, att.v_head_dim) == (3, 3, 5)
    assert att.scaling == pytest.approx(8**-0.5)  # the original 1/sqrt(head_dim)
    assert att.q_proj.weight.shape == (9, 32) and att.out_proj.weight.shape == (32, 15)
    assert plan.extra["heads"][ap] == [0, 2, 3]
    assert_exact(_patchtst_output(new, ctx), ref)


def test_patchtst_loss_and_predict():
    model = _patchtst()
    ad = get_adapter(model)
    ctx, tgt = _ts_inputs(torch.Generator().manual_seed(13))
    own = model(past_values=ctx.unsqueeze(-1), future_values=tgt.unsqueeze(-1)).loss
    torch.testing.assert_close(ad.loss(model, ctx, tgt), own)
    # a target beyond prediction_length trains on its first 16 steps (test_horizons.py)
    torch.testing.assert_close(ad.loss(model, ctx, torch.cat([tgt, torch.randn(5, 1)], -1)), own)
    with pytest.raises(ValueError, match="context"):
        ad.predict(model, ctx[:, :40], 8)
    longer = torch.cat([torch.randn(5, 10), ctx], dim=-1)  # only the last context_length values count
    torch.testing.assert_close(ad.predict(model, longer, 16), model(past_values=ctx.unsqueeze(-1)).prediction_outputs[..., 0])
    p = ad.predict(model, ctx, 40)  # rolls out beyond prediction_length 16
    assert p.shape == (5, 40) and torch.isfinite(p).all()
    torch.testing.assert_close(p[:, :16], ad.predict(model, ctx, 16))


def test_patchtst_multichannel_packing_is_per_series():
    model = _patchtst_multi()
    ad = get_adapter(model)
    ctx, _ = _ts_inputs(torch.Generator().manual_seed(14))
    together = ad.predict(model, ctx, 16)
    alone = torch.cat([ad.predict(model, ctx[i : i + 1], 16) for i in range(ctx.shape[0])])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_timesfm_scaling_follows_head_dims():
    model = _timesfm()
    ad = get_adapter(model, heads=False, block=4)
    assert ad.family == "timesfm"
    sites = ad.sites(model)
    masks = ones_masks(sites)
    ap = "decoder.layers.0.self_attn"
    keep = {0: [1, 5, 9], 1: [0, 2], 2: [3, 4, 7, 15], 3: []}  # q/k dims kept per head
    qk = torch.zeros(64)
    for h, dims in keep.items():
        qk[[h * 16 + d for d in dims]] = 1
    masks[f"{ap}.k_proj.out"] = qk
    masks[f"{ap}.o_proj.in"][48:] = 0  # head 3 removed
    attach_masks(model, sites, masks)
    ctx, _ = _ts_inputs(torch.Generator().manual_seed(15))
    ref = _timesfm_output(model, ctx)
    scaling = model.get_submodule(ap).scaling.detach().clone()
    new, plan = repack_model(model, ad, sites, masks)
    att = new.get_submodule(ap)
    assert (att.num_heads, att.head_dim, att.v_head_dim, att.orig_head_dim) == (3, 4, 16, 16)
    assert att.scaling.shape == (12,)
    for h in range(3):  # each head's slots carry the scaling of its own original dims
        dims = plan.keep[f"{ap}.scaling"]["rows"][4 * h : 4 * h + 4]
        assert set(keep[h]) <= set(dims) and len(set(dims)) == 4
        torch.testing.assert_close(att.scaling[4 * h : 4 * h + 4], scaling[dims])
    assert_exact(_timesfm_output(new, ctx), ref)


def test_timesfm25_keeps_full_qk_heads():
    model = _timesfm25()
    ad = get_adapter(model, heads=False, block=4)
    assert ad.family == "timesfm2.5"
    sites = ad.sites(model)
    masks = ones_masks(sites)
    ap = "model.layers.1.self_attn"
    masks[f"{ap}.q_proj.out"][torch.arange(64) % 16 >= 6] = 0  # q/k dims: kept whole (q/k norm over the head)
    masks[f"{ap}.v_proj.out"][torch.arange(64) % 16 >= 5] = 0
    masks[f"{ap}.v_proj.out"][16:32] = 0  # head 1 removed
    attach_masks(model, sites, masks)
    ctx, _ = _ts_inputs(torch.Generator().manual_seed(16))
    ref = _timesfm_output(model, ctx)
    new, _ = repack_model(model, ad, sites, masks)
    att = new.get_submodule(ap)
    assert (att.num_heads, att.head_dim, att.v_head_dim) == (3, 16, 5)
    assert att.q_proj.out_features == 48 and att.o_proj.in_features == 15
    assert_exact(_timesfm_output(new, ctx), ref)
    with pytest.raises(NotImplementedError, match="grouped-query"):
        get_adapter(_timesfm25(num_key_value_heads=2))


@pytest.mark.parametrize("name", ["timesfm", "timesfm2.5"])
def test_timesfm_loss_and_predict(name):
    model = CASES[name].build()
    ad = get_adapter(model)
    ctx, tgt = _ts_inputs(torch.Generator().manual_seed(17))
    kw = {"freq": [0] * 5} if name == "timesfm" else {}
    own = model(past_values=ctx, future_values=tgt, **kw).loss
    torch.testing.assert_close(ad.loss(model, ctx, tgt), own)
    assert torch.isfinite(ad.loss(model, ctx, tgt[:, :7]))
    # a target beyond prediction_length trains on its first 16 steps (test_horizons.py)
    torch.testing.assert_close(ad.loss(model, ctx, torch.cat([tgt, torch.randn(5, 1)], -1)), own)
    with torch.no_grad():
        point = model(past_values=ctx, **kw).mean_predictions
    torch.testing.assert_close(ad.predict(model, ctx, 10), point[:, :10])
    p = ad.predict(model, ctx, 40)  # beyond horizon_length 16: decoded again on the extended context
    assert p.shape == (5, 40) and torch.isfinite(p).all()
    torch.testing.assert_close(p[:, :16], point)


@pytest.mark.parametrize("name", list(CASES))
def test_repacked_model_refuses_to_be_pruned_again(name):
    case = CASES[name]
    _, new, _, ad, _, _ = _check_repack(case, False, torch.float32, seed=600)
    with pytest.raises(ValueError, match="already repacked"):
        ad.sites(new)


@pytest.mark.parametrize("name", [n for n in CASES if n != "chronos"])  # ChronosModel has no HF config
def test_save_and_load_pruned(name, tmp_path):
    """A repacked model saves and loads again without masks or calibration state."""
    from tsprune.plan import load_pruned, save_pruned

    case = CASES[name]
    _, new, plan, _, _, ctx = _check_repack(case, True, torch.float32, seed=700)
    save_pruned(new, tmp_path / "m", plan)
    back = load_pruned(tmp_path / "m")
    assert type(back) is type(new) and n_params(back) == n_params(new)
    torch.testing.assert_close(_forward(case, back, ctx), _forward(case, new, ctx), atol=0, rtol=0)


def test_t5_heads_without_qk_dims_keep_the_bias_scores():
    """q with no live input: q.k == 0 everywhere, but the heads still attend by position bias."""
    model = _chronos_bolt()
    ad = get_adapter(model, heads=False, block=4)
    sites = ad.sites(model)
    masks = ones_masks(sites)
    ap = "encoder.block.0.layer.0.SelfAttention"
    masks[f"{ap}.q.in"].zero_()
    attach_masks(model, sites, masks)
    ctx, _ = _bolt_inputs(torch.Generator().manual_seed(18))
    ref = _bolt_output(model, ctx)
    new, plan = repack_model(model, ad, sites, masks)
    att = new.get_submodule(ap)
    assert (att.n_heads, att.key_value_proj_dim, att.v_head_dim) == (2, 0, 16)
    assert isinstance(att.q, ZeroLinear) and isinstance(att.k, ZeroLinear)
    assert_exact(_bolt_output(new, ctx), ref)
