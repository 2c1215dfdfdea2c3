"""Chronos-2 family: chronos-forecasting's ``chronos.chronos2.Chronos2Model`` (chronos-2, 120M).

Stage of the flow: model -> **adapter** -> mask sites / coupled plan / restructured model; this file
holds the family's layout and objective, the engine (layout.py) derives the rest.
Receives a Chronos2Model; hands on its sites (every encoder block's time self-attention and group
attention q, k, v, o and its FFN wi -> act -> wo), a plan from mask values and the in-place
restructuring for repack and load. Input / output patch embeddings (residual MLPs) keep their hidden
width; with residual=True their stream side (output rows / input columns) goes with the stream.

Chronos-2 attention (``MHA``): no 1/sqrt(d) scaling, eager or SDPA. Time self-attention rotates q
and k with RoPE (``rotate_half``: within a head, dim j and dim j + d_kv/2 form one rotary pair with
frequency inv_freq[j]); group attention attends across the series of a group (no RoPE).

Repacked attention (``PrunedChronos2MHA``): per-layer ``n_heads``, q/k head dim ``kv_proj_dim`` and
v/o head dim ``v_head_dim`` (each uniform over the layer's kept heads, padded with the head's own
pruned dims, whose folded weights are zero, so the result is exact).

* RoPE pairs are coupled: q_rot[j] mixes q[j] and q[j + d/2], so a pair's contribution to q.k is
  zero only if both of its q dims or both of its k dims are gone. A pair survives iff some q dim of
  it and some k dim of it are effectively alive; a kept pair keeps both dims (a kept dim keeps its
  rotary partner). The repacked head lays its kept pairs out as [first halves | second halves], so
  ``rotate_half`` still pairs them, and rotates each with its ORIGINAL frequency: a per-head
  ``rope_inv_freq`` [n_heads, kv_proj_dim / 2] buffer gathered from the model's inv_freq (not
  saved: rebuilt by apply_plan from ``plan.extra["rope_pairs"]``).
* a layer with no head left adds o(empty) = 0 (o is a ZeroLinear); a layer whose heads have no q/k
  dim left attends with scores = the attention mask alone (q.k = 0), as the masked model does.

Objective: loss and predict go through the model's own forward (quantile loss; ``group_ids`` to
forecast several series of one group jointly, multivariate group attention). Beyond the model's
prediction length (max_output_patches x output_patch_size) predict is ``Chronos2Pipeline``'s own
long-horizon rollout (quantile-unrolled, weighted-quantile reduction).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from chronos.chronos2.layers import MHA, AttentionOutput, Chronos2LayerNorm, Chronos2RotaryEmbedding
from chronos.chronos2.model import Chronos2Model

from . import register
from ._common import median_index, trained_part
from .attention import split_heads, zero_scores
from .layout import FFN, Attention, Block, Layout, LayoutAdapter, Residual, RoPE, stream_modules


class PrunedChronos2MHA(MHA):
    """Chronos-2 MHA with per-layer ``n_heads``, q/k ``kv_proj_dim``, v/o ``v_head_dim`` and (time
    attention) per-head RoPE frequencies ``rope_inv_freq`` [n_heads, kv_proj_dim // 2]."""

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        # as Chronos2RotaryEmbedding: angles in float32, then cast; [P, n_heads, S, kv_proj_dim]
        inv = self.rope_inv_freq.to(device=device, dtype=torch.float32)
        pos = position_ids.to(device).float()
        freqs = pos[:, None, :, None] * inv[None, :, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rope_embed.attention_scaling
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def forward(self, hidden_states, mask, encoder_states=None, position_ids=None, output_attentions=False):
        b, s = hidden_states.shape[:2]
        n_heads, d_qk, d_v = self.n_heads, self.kv_proj_dim, self.v_head_dim
        if n_heads == 0:
            return AttentionOutput(hidden_states=self.o(hidden_states.new_zeros((b, s, 0))), attn_weights=None)
        src = encoder_states if encoder_states is not None else hidden_states
        query = split_heads(self.q(hidden_states), n_heads, d_qk)
        key = split_heads(self.k(src), n_heads, d_qk)
        value = split_heads(self.v(src), n_heads, d_v)
        if d_qk == 0:  # no q/k dim left: q.k == 0, the scores are the mask alone
            query, key = zero_scores(query, key)
        elif self.use_rope and encoder_states is None:
            if position_ids is None:
                raise ValueError("PrunedChronos2MHA: position_ids must be provided when use_rope=True")
            cos, sin = self._rope(position_ids, value.dtype, value.device)
            rot = Chronos2RotaryEmbedding.rotate_half
            query = query * cos + rot(query) * sin
            key = key * cos + rot(key) * sin
        weights = None
        if self.config._attn_implementation == "sdpa" and not output_attentions:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=1.0
            )
        else:
            scores = torch.matmul(query, key.transpose(3, 2)) + mask
            weights = F.softmax(scores.float(), dim=-1).type_as(scores)
            weights = F.dropout(weights, p=self.dropout, training=self.training)
            out = torch.matmul(weights, value)
        out = out.transpose(1, 2).reshape(b, s, n_heads * d_v)
        return AttentionOutput(hidden_states=self.o(out), attn_weights=weights if output_attentions else None)


# Chronos2Pipeline.predict's default ``unrolled_quantiles`` (the paths appended beyond p)
_UNROLLED_QUANTILES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


_SIZES = (("n_heads", "heads"), ("kv_proj_dim", "qk_dim"), ("v_head_dim", "v_dim"), ("inner_dim", "qk_inner"))


@register
class Chronos2Adapter(LayoutAdapter):
    """Chronos-2 (``Chronos2Model``).

    loss: the model's own quantile loss on the first min(H, p) target steps, p = max_output_patches
    x output_patch_size (enough output patches for the target). predict: the median quantile;
    beyond p, ``Chronos2Pipeline``'s long-horizon rollout. Both take ``group_ids`` [B] (series with
    the same id are forecast jointly through group attention; default: every series alone)."""

    family = "chronos2"
    model_classes = ("chronos.chronos2.model:Chronos2Model",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, Chronos2Model)

    @staticmethod
    def prediction_length(model) -> int:
        """Steps one forward pass forecasts (max_output_patches x output_patch_size)."""
        cc = model.chronos_config
        return int(cc.max_output_patches * cc.output_patch_size)

    # -- structure ------------------------------------------------------------------------------
    def layout(self, model: nn.Module) -> Layout:
        """Per encoder block: time self-attention (RoPE pairs), group attention, then the FFN."""
        blocks = []
        for i, _blk in enumerate(model.encoder.block):
            base = f"encoder.block.{i}.layer"
            attns = []
            for kind, ap in (("time_attn", f"{base}.0.self_attention"), ("group_attn", f"{base}.1.self_attention")):
                att = model.get_submodule(ap)
                rope = RoPE("rope_embed.inv_freq") if att.use_rope else None
                attns.append(Attention(ap, kind, att.n_heads, att.kv_proj_dim, _SIZES, rope=rope))
            fp = f"{base}.2.mlp"
            ffn = FFN(fp, ("ffn.wi", f"{fp}.wi"), ("ffn.wo", f"{fp}.wo"), model.get_submodule(fp).act)
            blocks.append(Block(f"encoder.{i}", tuple(attns), (ffn,)))
        return Layout(tuple(blocks), PrunedChronos2MHA, extra=("heads", "rope_pairs", "ffn"),
                      residual=self._residual(model), gates=True)

    @staticmethod
    def _residual(model: nn.Module) -> Residual:
        """The stream enters encoder block 0 from the input patch embedding (and the REG token's
        embedding); every Chronos2LayerNorm over it is RMS (T5 style); the output patch embedding
        reads the final norm's output. RoPE acts inside the heads."""
        d = int(model.config.d_model)
        embs, norms = stream_modules(model, d, Chronos2LayerNorm)
        return Residual(d, ("encoder.block.0",),
                        ("input_patch_embedding.output_layer", "input_patch_embedding.residual_layer"),
                        ("output_patch_embedding.hidden_layer", "output_patch_embedding.residual_layer"), embs, norms,
                        width_attrs=(("", "model_dim"),))  # the model asserts the encoder output width

    # -- objective ------------------------------------------------------------------------------
    @staticmethod
    def _groups(group_ids, b: int, device):
        if group_ids is None:
            return None
        g = torch.as_tensor(group_ids, device=device)
        if g.shape != (b,) or g.dtype.is_floating_point:
            raise ValueError(
                f"Chronos-2: group_ids must be an integer tensor of shape ({b},), got {tuple(g.shape)} {g.dtype}"
            )
        return g.long()

    def loss(self, model, context, target, group_ids=None):
        """context [B, L], target [B, H] float; group_ids [B] int or None. Scalar quantile loss."""
        target = trained_part(target, self.prediction_length(model))
        n = math.ceil(target.shape[-1] / model.chronos_config.output_patch_size)
        g = self._groups(group_ids, context.shape[0], context.device)
        return model(context=context, group_ids=g, num_output_patches=n, future_target=target).loss

    @torch.no_grad()
    def predict(self, model, context, horizon, group_ids=None):
        """Median forecast [B, horizon] for context [B, L]; group_ids as in ``loss``."""
        p = self.prediction_length(model)
        mi = median_index(model.chronos_config.quantiles)
        b = context.shape[0]
        g = self._groups(group_ids, b, context.device)
        if horizon <= p:
            n = math.ceil(horizon / model.chronos_config.output_patch_size)
            return model(context=context, group_ids=g, num_output_patches=n).quantile_preds[:, mi, :horizon]
        from chronos.chronos2.pipeline import Chronos2Pipeline

        pipe = Chronos2Pipeline(model)
        if g is None:
            g = torch.arange(b, device=context.device)
        nan = torch.full((b, horizon), float("nan"), device=context.device)  # no known future covariates
        ctx = context[..., -model.chronos_config.context_length :]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (q,) = pipe._predict_batch(
                context=ctx, group_ids=g, future_covariates=nan,
                unrolled_quantiles_tensor=torch.tensor(_UNROLLED_QUANTILES),
                prediction_length=horizon, max_output_patches=model.chronos_config.max_output_patches,
                target_idx_ranges=[(0, b)],
            )
        return q[:, mi, :horizon].to(device=context.device, dtype=context.dtype)
