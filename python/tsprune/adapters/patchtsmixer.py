"""PatchTSMixer family: transformers ``PatchTSMixerForPrediction`` (an MLP-mixer TSFM, the
architecture of IBM's TTM; docs/METHOD.md "Families").

Stage of the flow: model -> **adapter** -> mask sites / coupled plan / restructured model; this file
holds the family's layout and objective, the engine (layout.py) derives the rest.
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

import torch.nn.functional as F
from torch import nn
from transformers.models.patchtsmixer.modeling_patchtsmixer import (
    PatchTSMixerAttention,
    PatchTSMixerForPrediction,
    PatchTSMixerLayer,
)

from . import register
from .layout import FFN, Attention, Block, Layout
from .patchtst import BART_PROJ, BART_SIZES, PointForecastAdapter, PrunedPatchTSTAttention


class PrunedPatchTSMixerAttention(PatchTSMixerAttention):
    """PatchTSMixerAttention with per-layer ``num_heads``, q/k ``head_dim`` and v/o ``v_head_dim``;
    ``scaling`` keeps its original value. Same attribute names as PatchTST's attention (both are the
    Wav2Vec2 attention), so it shares PrunedPatchTSTAttention's forward."""

    forward = PrunedPatchTSTAttention.forward


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


_MLPS = (("patch", "patch_mixer.mlp"), ("feature", "feature_mixer.mlp"), ("channel", "channel_feature_mixer.mlp"))


@register
class PatchTSMixerAdapter(PointForecastAdapter):
    """PatchTSMixer: the layout below, the point-forecast objective of ``PointForecastAdapter``.
    C > 1 input channels are packed only in ``common_channel`` mode (channel-independent);
    ``mix_channel`` mixes channels and needs C == 1 for single series."""

    family = "patchtsmixer"
    name = "PatchTSMixer"
    model_classes = ("transformers.models.patchtsmixer.modeling_patchtsmixer:PatchTSMixerForPrediction",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, PatchTSMixerForPrediction)

    # -- structure ------------------------------------------------------------------------------
    def layout(self, model: nn.Module) -> Layout:
        """Per mixer layer: the patch mixer's self-attention (when present), then the patch, feature
        and (mix_channel) channel MLPs, each fc1 -> gelu -> fc2."""
        blocks = []
        layers = [n for n, m in model.named_modules() if isinstance(m, PatchTSMixerLayer)]
        for i, lp in enumerate(layers):
            attns = []
            ap = f"{lp}.patch_mixer.self_attn_layer"
            att = _get(model, ap)
            if att is not None:
                attns.append(Attention(ap, "self_attn", att.num_heads, att.head_dim, BART_SIZES, proj=BART_PROJ))
            ffns = [
                FFN(mp, (f"ffn.{name}.fc1", f"{mp}.fc1"), (f"ffn.{name}.fc2", f"{mp}.fc2"), F.gelu)
                for name, mp in ((name, f"{lp}.{rel}") for name, rel in _MLPS) if _get(model, mp) is not None
            ]
            blocks.append(Block(f"mixer.{i}", tuple(attns), tuple(ffns)))
        return Layout(tuple(blocks), PrunedPatchTSMixerAttention)

    # -- objective (PointForecastAdapter) -------------------------------------------------------
    def _check_channels(self, cfg) -> None:
        if cfg.mode != "common_channel":
            raise ValueError(
                f"PatchTSMixer with num_input_channels {cfg.num_input_channels} in mode {cfg.mode!r} mixes "
                "channels; single series need mode='common_channel' (channel-independent) or num_input_channels=1"
            )
        if cfg.prediction_channel_indices is not None:
            raise ValueError("PatchTSMixer: prediction_channel_indices must be None to forecast packed single series")
