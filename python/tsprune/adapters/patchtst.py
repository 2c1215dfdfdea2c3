"""PatchTST family: transformers ``PatchTSTForPrediction``.

Stage of the flow: model -> **adapter** -> mask sites / coupled plan / restructured model; this file
holds the family's layout and objective, the engine (layout.py) derives the rest.
Receives a PatchTSTForPrediction; hands on its sites (every encoder layer's self_attn q_proj, k_proj,
v_proj, out_proj and its position-wise FFN ``ff``: first Linear = up, last Linear = down), a plan
from mask values, and the in-place restructuring for repack and load. Embedding and head are not
pruned.

Repacked attention (``PrunedPatchTSTAttention``): per-layer ``num_heads``; q/k and v/o keep separate
uniform head dims (``head_dim`` for q/k, ``v_head_dim`` for v/o; heads pad with their own pruned
dims, whose folded weights are zero); ``scaling`` stays the ORIGINAL 1/sqrt(head_dim) whatever the
new q/k dim. A layer without heads returns out_proj's bias (a ZeroLinear); a layer whose heads lost
every q/k dim attends uniformly, as the masked model does (q.k = 0). Linears carry biases here, so a
q/k/v output with a nonzero bias stays alive even when every input channel is masked.

Context: [B, L] series; the last ``context_length`` values are used (shorter raises). With
``num_input_channels`` C > 1 (channel-independent, shared embedding and projection, no channel
attention) the batch is packed C series per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.patchtst.modeling_patchtst import (
    ALL_ATTENTION_FUNCTIONS,
    PatchTSTAttention,
    PatchTSTEncoderLayer,
    PatchTSTForPrediction,
    eager_attention_forward,
)

from . import register
from ._common import pack_series, roll_out, trained_part, unpack_series
from .attention import heads_attention
from .layout import FFN, Attention, Block, Layout, LayoutAdapter

# the Wav2Vec2 / Bart attention of PatchTST and PatchTSMixer: projection names and reshape sizes
BART_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
BART_SIZES = (("num_heads", "heads"), ("head_dim", "qk_dim"), ("v_head_dim", "v_dim"))


class PrunedPatchTSTAttention(PatchTSTAttention):
    """PatchTSTAttention with per-layer ``num_heads``, q/k ``head_dim`` and v/o ``v_head_dim``; the
    ``scaling`` attribute keeps its original value."""

    def forward(self, hidden_states, key_value_states=None, attention_mask=None, output_attentions=False, **kwargs):
        return heads_attention(
            self, hidden_states, key_value_states, attention_mask, proj=BART_PROJ,
            dims=(self.num_heads, self.head_dim, self.v_head_dim),
            attention=ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward),
            scaling=self.scaling, dropout=self.dropout if self.training else 0.0,
            output_attentions=output_attentions, **kwargs,
        )


class PointForecastAdapter(LayoutAdapter):
    """Objective of transformers' point-forecast models (``past_values`` [B, L, C] ->
    ``prediction_outputs`` [B, p, C], optional distribution head): PatchTST and PatchTSMixer.

    loss: MSE of the point forecast over the first min(H, p) target steps (the model's own MSE
    loss); a distribution head uses the model's own NLL and needs at least p target steps and a full
    channel pack. predict: the point forecast (a distribution head: its mean); beyond p it is
    appended to the context and forecast again from its last ``context_length`` values
    (transformers has no pipeline for these models). Context [B, L >= context_length]; with C > 1
    input channels (channel-independent) the batch is packed C series per sample. Subclasses say
    when packing is allowed (``_check_channels``)."""

    name = ""

    @staticmethod
    def prediction_length(model) -> int:
        """Steps one forward pass forecasts (and the longest target the loss trains on)."""
        return int(model.config.prediction_length)

    def _check_channels(self, cfg) -> None:
        """Raise ValueError where C > 1 channels cannot be forecast as independent series."""

    def _pack(self, model, x: torch.Tensor) -> torch.Tensor:
        """[B, T] series -> [ceil(B / C), T, C] (C = num_input_channels; last row repeated as padding)."""
        if model.config.num_input_channels > 1:
            self._check_channels(model.config)
        return pack_series(x, model.config.num_input_channels)

    def _context(self, model, context: torch.Tensor) -> torch.Tensor:
        n = model.config.context_length
        if context.ndim != 2 or context.shape[-1] < n:
            raise ValueError(f"{self.name} needs a context [B, >= {n}], got shape {tuple(context.shape)}")
        return self._pack(model, context[..., -n:])

    def _point(self, model, context: torch.Tensor) -> torch.Tensor:
        """Point forecast [B, p] of one forward pass."""
        out = model(past_values=self._context(model, context))
        if model.distribution_output is not None:
            y = model.distribution_output.distribution(out.prediction_outputs, loc=out.loc, scale=out.scale).mean
        else:
            y = out.prediction_outputs
        return unpack_series(y, context.shape[0])

    def loss(self, model, context, target):
        p = self.prediction_length(model)
        target = trained_part(target, p)
        h = target.shape[-1]
        if model.distribution_output is None:
            return F.mse_loss(self._point(model, context)[:, :h], target)
        if h != p or context.shape[0] % model.config.num_input_channels:
            raise ValueError(
                f"{self.name} NLL loss: needs >= {p} target steps (got {h}) and a batch that is a multiple "
                f"of num_input_channels {model.config.num_input_channels} (got {context.shape[0]})"
            )
        return model(past_values=self._context(model, context), future_values=self._pack(model, target)).loss

    @torch.no_grad()
    def predict(self, model, context, horizon):
        return roll_out(lambda ctx: self._point(model, ctx), context, horizon)


@register
class PatchTSTAdapter(PointForecastAdapter):
    """PatchTST: the layout below, the point-forecast objective of ``PointForecastAdapter``. C > 1
    input channels are packed only with channel-independent weights (shared embedding and
    projection, no channel attention)."""

    family = "patchtst"
    name = "PatchTST"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, PatchTSTForPrediction)

    # -- structure ------------------------------------------------------------------------------
    def layout(self, model: nn.Module) -> Layout:
        """Per encoder layer: self_attn, then the position-wise FFN ``ff`` (first Linear up, last down)."""
        blocks = []
        layers = [n for n, m in model.named_modules() if isinstance(m, PatchTSTEncoderLayer)]
        for i, lp in enumerate(layers):
            ap, fp = f"{lp}.self_attn", f"{lp}.ff"
            att = model.get_submodule(ap)
            ff = model.get_submodule(fp)
            idx = [j for j, m in enumerate(ff) if isinstance(m, nn.Linear)]
            if len(idx) != 2:
                raise TypeError(f"{fp}: expected two Linears, found {len(idx)}")
            act = next(m for m in list(ff)[idx[0] + 1 : idx[1]] if not isinstance(m, (nn.Dropout, nn.Identity)))
            blocks.append(Block(
                f"encoder.{i}",
                (Attention(ap, "self_attn", att.num_heads, att.head_dim, BART_SIZES, proj=BART_PROJ),),
                (FFN(fp, ("ffn.fc1", f"{fp}.{idx[0]}"), ("ffn.fc2", f"{fp}.{idx[1]}"), act),),
            ))
        return Layout(tuple(blocks), PrunedPatchTSTAttention)

    # -- objective (PointForecastAdapter) -------------------------------------------------------
    def _check_channels(self, cfg) -> None:
        if cfg.channel_attention or not cfg.share_embedding or not cfg.share_projection:
            raise ValueError(
                "PatchTST with num_input_channels > 1 needs channel-independent weights "
                "(share_embedding, share_projection, no channel_attention) to forecast single series"
            )
