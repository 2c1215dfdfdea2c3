"""PatchTSMixer family: transformers ``PatchTSMixerForPrediction`` (an MLP-mixer TSFM, the
architecture of IBM's TTM; docs/METHOD.md "Families").

Stage of the flow: model -> **adapter** -> mask sites / coupled plan / restructured model.
Receives a PatchTSMixerForPrediction; hands on its sites, a plan from mask values and the in-place
restructuring for repack and load. Per mixer layer (``model.encoder.mlp_mixer_encoder.mixers.i``):

* the patch-mixing MLP ``patch_mixer.mlp`` (fc1: num_patches -> num_patches x expansion, gelu, fc2
  back), its hidden channels pruned (kind ``ffn.patch.fc1`` / ``ffn.patch.fc2``);
* the feature-mixing MLP ``feature_mixer.mlp`` (d_model -> d_model x expansion -> d_model), hidden
  channels pruned (``ffn.feature.*``);
* with ``mode="mix_channel"``, the channel-mixing MLP ``channel_feature_mixer.mlp`` likewise
  (``ffn.channel.*``);
* with ``self_attn=True``, the patch mixer's attention heads / head dims (``self_attn.q`` ...), as
  in PatchTST: q/k and v/o keep separate uniform head dims, ``scaling`` stays the ORIGINAL
  1/sqrt(head_dim).

Gated attention (``gated_attn=True``: x * softmax(W x + b) after each MLP) is kept working and not
pruned: its softmax runs over the whole stream width (patches, d_model or channels), which tsprune
does not remove, so removing any of its units would change every gate. Patch embedding, scaler and
head are not pruned. Biases are kept: an MLP hidden channel whose fc1 row is gone but whose bias is
nonzero stays (gelu(b) != 0 still feeds fc2), exactly as the masked model computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.patchtsmixer.modeling_patchtsmixer import (
    PatchTSMixerAttention,
    PatchTSMixerForPrediction,
    PatchTSMixerLayer,
)

from . import register
from ._common import (
    PlanBuilder,
    apply_linears,
    attention_sites,
    ffn_sites,
    plan_attention,
    plan_ffn,
    refuse_repacked,
    resolve_block,
    trained_part,
)
from .base import Adapter, Plan, Site
from .patchtst import PrunedPatchTSTAttention


class PrunedPatchTSMixerAttention(PatchTSMixerAttention):
    """PatchTSMixerAttention with per-layer ``num_heads``, q/k ``head_dim`` and v/o ``v_head_dim``;
    ``scaling`` keeps its original value. Same attribute names as PatchTST's attention (both are the
    Wav2Vec2 attention), so it shares PrunedPatchTSTAttention's forward."""

    forward = PrunedPatchTSTAttention.forward


_MLPS = (("patch", "patch_mixer.mlp"), ("feature", "feature_mixer.mlp"), ("channel", "channel_feature_mixer.mlp"))


@register
class PatchTSMixerAdapter(Adapter):
    """loss: MSE of the point forecast over the first min(H, ``prediction_length``) target steps (the
    model's own MSE loss; a distribution head uses the model's own NLL and needs at least
    ``prediction_length`` steps and a full channel pack).
    predict: ``prediction_outputs`` (a distribution head: its mean); beyond ``prediction_length`` the
    forecast is appended to the context and forecast again (transformers has no pipeline for it).

    Context: [B, L] series, the last ``context_length`` values used (shorter raises). With
    ``num_input_channels`` C > 1 in ``common_channel`` mode (channel-independent) the batch is packed
    C series per sample; ``mix_channel`` mixes channels and needs C == 1 for single series."""

    family = "patchtsmixer"
    model_classes = ("transformers.models.patchtsmixer.modeling_patchtsmixer:PatchTSMixerForPrediction",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, PatchTSMixerForPrediction)

    @staticmethod
    def prediction_length(model) -> int:
        """Steps one forward pass forecasts (and the longest target the loss trains on)."""
        return int(model.config.prediction_length)

    # -- structure ------------------------------------------------------------------------------
    @staticmethod
    def _layers(model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, PatchTSMixerLayer)]

    @staticmethod
    def _mlps(model: nn.Module, lp: str) -> list[tuple[str, str]]:
        """[(name, mlp path)] of one mixer layer (patch, feature, and channel in mix_channel mode)."""
        out = []
        for name, rel in _MLPS:
            try:
                model.get_submodule(f"{lp}.{rel}")
            except AttributeError:
                continue
            out.append((name, f"{lp}.{rel}"))
        return out

    @staticmethod
    def _attn(model: nn.Module, lp: str) -> str | None:
        ap = f"{lp}.patch_mixer.self_attn_layer"
        try:
            model.get_submodule(ap)
        except AttributeError:
            return None
        return ap

    @staticmethod
    def _proj(ap: str) -> dict[str, str]:
        return {"q": f"{ap}.q_proj", "k": f"{ap}.k_proj", "v": f"{ap}.v_proj", "o": f"{ap}.out_proj"}

    def sites(self, model: nn.Module) -> list[Site]:
        refuse_repacked(model, (PrunedPatchTSMixerAttention,))
        rb = resolve_block(self.block, "residual", resolve_block(self.block, "ffn"))
        sites: list[Site] = []
        for i, lp in enumerate(self._layers(model)):
            layer = f"mixer.{i}"
            ap = self._attn(model, lp)
            if ap is not None:
                att = model.get_submodule(ap)
                sites += attention_sites(
                    model, self._proj(ap), att.num_heads, att.head_dim,
                    heads=self.heads, residual_block=rb, layer=layer, kind="self_attn",
                )
            for name, mp in self._mlps(model, lp):
                sites += ffn_sites(
                    model, {f"ffn.{name}.fc1": f"{mp}.fc1"}, (f"ffn.{name}.fc2", f"{mp}.fc2"),
                    block=self.block, residual_block=rb, layer=layer,
                )
        return sites

    # -- plan -----------------------------------------------------------------------------------
    def plan(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> Plan:
        by_path = {s.path: s for s in self.sites(model)}
        plan = Plan(family=self.family, extra={"heads": {}, "ffn": {}})
        pb = PlanBuilder(plan)
        for lp in self._layers(model):
            ap = self._attn(model, lp)
            if ap is not None:
                att = model.get_submodule(ap)
                hp = plan_attention(model, pb, by_path, masks, self._proj(ap), att.num_heads, att.head_dim)
                plan.attrs[ap] = {"num_heads": len(hp.heads), "head_dim": hp.qk_dim, "v_head_dim": hp.v_dim}
                plan.extra["heads"][ap] = hp.heads
            for _name, mp in self._mlps(model, lp):
                keep = plan_ffn(model, pb, by_path, masks, act=F.gelu, up=f"{mp}.fc1", down=f"{mp}.fc2")
                plan.extra["ffn"][mp] = len(keep)
        return plan

    def apply_plan(self, model: nn.Module, plan: Plan) -> None:
        apply_linears(model, plan)
        for ap, attrs in plan.attrs.items():
            att = model.get_submodule(ap)
            if not isinstance(att, PatchTSMixerAttention):
                raise ValueError(f"PatchTSMixer plan: attrs.{ap} is not an attention module")
            if not isinstance(att, PrunedPatchTSMixerAttention):
                att.__class__ = PrunedPatchTSMixerAttention
            for k, v in attrs.items():
                setattr(att, k, int(v))

    # -- objective ------------------------------------------------------------------------------
    @staticmethod
    def _pack(model, x: torch.Tensor) -> torch.Tensor:
        """[B, T] series -> [ceil(B / C), T, C] (C = num_input_channels; last row repeated as padding)."""
        cfg = model.config
        c = cfg.num_input_channels
        if c == 1:
            return x.unsqueeze(-1)
        if cfg.mode != "common_channel":
            raise ValueError(
                f"PatchTSMixer with num_input_channels {c} in mode {cfg.mode!r} mixes channels; single series "
                "need mode='common_channel' (channel-independent) or num_input_channels=1"
            )
        if cfg.prediction_channel_indices is not None:
            raise ValueError("PatchTSMixer: prediction_channel_indices must be None to forecast packed single series")
        b = x.shape[0]
        pad = (-b) % c
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])], dim=0)
        return x.reshape(-1, c, x.shape[-1]).transpose(1, 2)

    @staticmethod
    def _unpack(y: torch.Tensor, b: int) -> torch.Tensor:
        """[B', T, C] -> [B, T]."""
        return y.transpose(1, 2).reshape(-1, y.shape[1])[:b]

    def _context(self, model, context: torch.Tensor) -> torch.Tensor:
        n = model.config.context_length
        if context.ndim != 2 or context.shape[-1] < n:
            raise ValueError(f"PatchTSMixer needs a context [B, >= {n}], got shape {tuple(context.shape)}")
        return self._pack(model, context[..., -n:])

    def _point(self, model, context: torch.Tensor) -> torch.Tensor:
        out = model(past_values=self._context(model, context))
        if model.distribution_output is not None:
            y = model.distribution_output.distribution(out.prediction_outputs, loc=out.loc, scale=out.scale).mean
        else:
            y = out.prediction_outputs
        return self._unpack(y, context.shape[0])

    def loss(self, model, context, target):
        p = self.prediction_length(model)
        target = trained_part(target, p)
        h = target.shape[-1]
        if model.distribution_output is None:
            return F.mse_loss(self._point(model, context)[:, :h], target)
        if h != p or context.shape[0] % model.config.num_input_channels:
            raise ValueError(
                f"PatchTSMixer NLL loss: needs >= {p} target steps (got {h}) and a batch that is a multiple "
                f"of num_input_channels {model.config.num_input_channels} (got {context.shape[0]})"
            )
        return model(past_values=self._context(model, context), future_values=self._pack(model, target)).loss

    @torch.no_grad()
    def predict(self, model, context, horizon):
        outs, ctx, left = [], context, horizon
        while left > 0:
            y = self._point(model, ctx)
            outs.append(y[:, :left])
            left -= y.shape[-1]
            ctx = torch.cat([ctx, y.to(ctx.dtype)], dim=-1)
        return torch.cat(outs, dim=-1)
