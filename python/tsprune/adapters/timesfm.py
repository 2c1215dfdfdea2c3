"""TimesFM family: transformers ``TimesFmModelForPrediction`` (TimesFM 1.0 / 2.0) and
``TimesFm2_5ModelForPrediction`` (TimesFM 2.5).

Stage of the flow: model -> **adapter** -> mask sites / coupled plan / restructured model; this file
holds the family's layout and objective, the engine (layout.py) derives the rest.
Receives one of the two prediction models; hands on its sites (every decoder layer's self_attn
q_proj, k_proj, v_proj, o_proj and its MLP: gate_proj -> relu -> down_proj in 1.0/2.0, fc1 -> act ->
fc2 in 2.5), a plan from mask values and the in-place restructuring for repack and load. Input and
output residual blocks are not pruned.

TimesFM 1.0 / 2.0 (``PrunedTimesFmAttention``): per-layer heads, separate uniform q/k and v/o head
dims. The learnable per-dim query ``scaling`` [head_dim] follows the q/k dims: since each head keeps
its own dims, it becomes a flat per-head parameter [num_heads * head_dim'] gathered from the
original (head h, slot j -> original dim of that slot); the constant 1/sqrt(head_dim) keeps the
ORIGINAL head_dim.

TimesFM 2.5 (``PrunedTimesFm2_5Attention``): q and k are RMS-normalised over the head dim and rotated
(RoPE) before the per-dim scaling, so removing a single q/k dim would change the norm: kept heads
keep all q/k dims (exact: a pruned q/k dim is a zero row before the norm, as in the masked model);
heads are removed and v/o dims pruned per layer. Grouped-query attention (num_key_value_heads <
num_attention_heads) is not supported yet and raises.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.timesfm.modeling_timesfm import (
    ALL_ATTENTION_FUNCTIONS,
    TimesFmAttention,
    TimesFmDecoderLayer,
    TimesFmModelForPrediction,
    simple_eager_attention_forward,
)

from . import register
from ._common import roll_out, trained_part
from .attention import heads_attention
from .layout import FFN, Attention, Block, Layout, LayoutAdapter, Norm, Residual

try:  # TimesFM 2.5 is in recent transformers only
    from transformers.models.timesfm2_5.modeling_timesfm2_5 import (
        TimesFm2_5Attention,
        TimesFm2_5DecoderLayer,
        TimesFm2_5ModelForPrediction,
        apply_rotary_pos_emb,
    )
    from transformers.models.timesfm2_5.modeling_timesfm2_5 import (
        eager_attention_forward as _eager_2_5,
    )
except ImportError:  # pragma: no cover
    TimesFm2_5ModelForPrediction = None


_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def _interface(att, eager):
    return ALL_ATTENTION_FUNCTIONS.get_interface(att.config._attn_implementation, eager)


class PrunedTimesFmAttention(TimesFmAttention):
    """TimesFmAttention with per-layer ``num_heads``, q/k ``head_dim``, v/o ``v_head_dim`` and a
    per-head per-dim ``scaling`` [num_heads * head_dim]; ``orig_head_dim`` sizes the constant."""

    def _scale_query(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = F.softplus(self.scaling).mul(1.442695041 / math.sqrt(self.orig_head_dim))
        return query * scale.view(1, self.num_heads, 1, self.head_dim), key

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return heads_attention(
            self, hidden_states, None, attention_mask, proj=_PROJ,
            dims=(self.num_heads, self.head_dim, self.v_head_dim),
            attention=_interface(self, simple_eager_attention_forward), scaling=1.0,
            dropout=self.attention_dropout if self.training else 0.0, prepare=self._scale_query, **kwargs,
        )


if TimesFm2_5ModelForPrediction is not None:

    class PrunedTimesFm2_5Attention(TimesFm2_5Attention):
        """TimesFm2_5Attention with per-layer ``num_heads`` and v/o ``v_head_dim`` (q/k keep the full
        ``head_dim``, so RoPE, q/k norms and the per-dim scaling are unchanged)."""

        def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
            if cache is None:
                cache = kwargs.pop("past_key_values", None)

            def prepare(query, key):  # as TimesFM 2.5: RoPE, q/k RMS norm, per-dim query scaling
                query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
                scale = F.softplus(self.scaling).mul(1.442695041 / math.sqrt(self.head_dim))
                return self.q_norm(query) * scale[None, None, None, :], self.k_norm(key)

            return heads_attention(
                self, hidden_states, None, attention_mask, proj=_PROJ,
                dims=(self.num_heads, self.head_dim, self.v_head_dim), attention=_interface(self, _eager_2_5),
                scaling=1.0, dropout=self.attention_dropout if self.training else 0.0, prepare=prepare,
                cache=cache, **kwargs,
            )


class _TimesFmBase(LayoutAdapter):
    """Layout of both TimesFM generations: per decoder layer, self_attn then the MLP."""

    layer_cls: type = nn.Module
    pruned_cls: type = nn.Module
    up, down = "gate_proj", "down_proj"  # MLP Linears (``mlp.<name>``)
    sizes: tuple[tuple[str, str], ...] = ()
    qk_full = False
    head_params: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, *, block=1, heads: bool = False, freq: int = 0):
        """freq: TimesFM frequency id of the series (0 high, 1 medium, 2 low); 1.0/2.0 only."""
        super().__init__(model, block=block, heads=heads)
        self.freq = int(freq)

    @staticmethod
    def prediction_length(model) -> int:
        """Steps one forward pass forecasts (``horizon_length``; the longest target the loss trains on)."""
        return int(model.config.horizon_length)

    def _act(self, mlp):
        return F.relu

    def layout(self, model: nn.Module) -> Layout:
        blocks = []
        layers = [n for n, m in model.named_modules() if isinstance(m, self.layer_cls)]
        for i, lp in enumerate(layers):
            ap, mp = f"{lp}.self_attn", f"{lp}.mlp"
            att = model.get_submodule(ap)
            attn = Attention(ap, "self_attn", att.q_proj.out_features // att.head_dim, att.head_dim, self.sizes,
                             proj=_PROJ, qk_full=self.qk_full,
                             head_params=self.head_params, **self._attn_gate(lp))
            ffn = FFN(mp, (f"ffn.{self.up}", f"{mp}.{self.up}"), (f"ffn.{self.down}", f"{mp}.{self.down}"),
                      self._act(model.get_submodule(mp)), **self._ffn_gate(lp))
            blocks.append(Block(f"decoder.{i}", (attn,), (ffn,)))
        if not layers:
            return Layout(tuple(blocks), self.pruned_cls)
        return Layout(tuple(blocks), self.pruned_cls, residual=self._residual(model, layers), gates=True)

    def _attn_gate(self, lp: str) -> dict:
        """Where the attention sub-block's contribution is gated (default: the attention's output)."""
        return {}

    def _ffn_gate(self, lp: str) -> dict:
        return {}

    def _residual(self, model: nn.Module, layers: list[str]) -> Residual:
        raise NotImplementedError


@register
class TimesFmAdapter(_TimesFmBase):
    """TimesFM 1.0 / 2.0 (``TimesFmModelForPrediction``).

    loss: the model's own loss, MSE of the mean forecast + quantile loss (a target shorter than
    ``horizon_length`` compares the first steps with the same formula; a longer one trains on its
    first ``horizon_length`` steps).
    predict: ``mean_predictions``; beyond ``horizon_length`` the mean forecast is appended to the
    context and decoded again: the same numbers as the model's own decode loop
    (``TimesFmModelForPrediction.forward`` with ``horizon_len`` = H, which decodes
    ceil(H / horizon_length) output patches the same way)."""

    family = "timesfm"
    layer_cls = TimesFmDecoderLayer
    pruned_cls = PrunedTimesFmAttention

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, TimesFmModelForPrediction)

    # the per-dim query scaling [head_dim] becomes per head [num_heads * head_dim'] (head_params);
    # the constant 1/sqrt(head_dim) keeps the original head dim (orig_head_dim)
    sizes = (("num_heads", "heads"), ("head_dim", "qk_dim"), ("v_head_dim", "v_dim"),
             ("orig_head_dim", "orig_qk_dim"), ("q_size", "qk_inner"), ("kv_size", "qk_inner"))
    head_params = ("scaling",)

    def _ffn_gate(self, lp):
        # the MLP adds its own input back (outputs + x): its contribution is down_proj's output
        return {"gate_at": f"{lp}.mlp.down_proj"}

    def _residual(self, model, layers):
        """The stream enters decoder layer 0 after the input block, the sinusoidal position
        embedding (a computed width-d output: its kept channels are selected) and the frequency
        embedding; each layer's RMS input norm and the MLP's LayerNorm (mean-subtracting: kept
        exact by its statistics over the original width, its removed channels being zeros that no
        reader sees); horizon_ff_layer reads it."""
        d = int(model.config.hidden_size)
        pos = tuple(n for n, m in model.named_modules() if type(m).__name__ == "TimesFmPositionalEmbedding")
        norms = tuple(n for lp in layers for n in (Norm(f"{lp}.input_layernorm"),
                                                   Norm(f"{lp}.mlp.layer_norm", eps="eps", mean=True)))
        return Residual(d, (layers[0],), ("decoder.input_ff_layer.output_layer", "decoder.input_ff_layer.residual_layer"),
                        ("horizon_ff_layer.input_layer", "horizon_ff_layer.residual_layer"), ("decoder.freq_emb",),
                        norms, computed=pos)

    def _forward(self, model, context, future=None):
        freq = [self.freq] * context.shape[0]
        return model(past_values=context, freq=freq, future_values=future)

    def loss(self, model, context, target):
        p = model.config.horizon_length
        target = trained_part(target, p)
        h = target.shape[-1]
        if h == p:
            return self._forward(model, context, target).loss
        out = self._forward(model, context)
        return F.mse_loss(out.mean_predictions[:, :h], target) + model._quantile_loss(
            out.full_predictions[:, :h, 1:], target
        )

    @torch.no_grad()
    def predict(self, model, context, horizon):
        return roll_out(lambda ctx: self._forward(model, ctx).mean_predictions, context, horizon)


if TimesFm2_5ModelForPrediction is not None:

    @register
    class TimesFm2_5Adapter(_TimesFmBase):
        """TimesFM 2.5 (``TimesFm2_5ModelForPrediction``).

        loss: the model's own loss (normalised MSE of the median + quantile loss) on the first
        min(H, ``horizon_length``) target steps.
        predict: ``mean_predictions`` (the ``decode_index`` quantile); beyond ``horizon_length`` the
        forecast is appended to the context and decoded again (transformers' TimesFM 2.5 forecasts
        at most ``horizon_length`` steps itself; this is the 1.0/2.0 decode loop's rule)."""

        family = "timesfm2.5"
        layer_cls = TimesFm2_5DecoderLayer
        pruned_cls = PrunedTimesFm2_5Attention
        up, down = "fc1", "fc2"
        sizes = (("num_heads", "heads"), ("head_dim", "qk_dim"), ("v_head_dim", "v_dim"))
        qk_full = True

        @classmethod
        def matches(cls, model: nn.Module) -> bool:
            return isinstance(model, TimesFm2_5ModelForPrediction)

        def __init__(self, model, **kw):
            super().__init__(model, **kw)
            cfg = model.config
            if cfg.num_key_value_heads != cfg.num_attention_heads:
                raise NotImplementedError(
                    "tsprune: TimesFM 2.5 with grouped-query attention "
                    f"({cfg.num_key_value_heads} kv heads for {cfg.num_attention_heads} heads) is not supported"
                )

        def _act(self, mlp):
            return mlp.activation_fn

        # each sub-block's output passes a post-norm before it is added: the gate scales that
        # norm's output (a gate before it would be normalised away) and folds into its weight
        def _attn_gate(self, lp):
            return {"gate_at": f"{lp}.post_attention_layernorm", "gate_fold": f"{lp}.post_attention_layernorm"}

        def _ffn_gate(self, lp):
            return {"gate_at": f"{lp}.post_feedforward_layernorm", "gate_fold": f"{lp}.post_feedforward_layernorm"}

        def _residual(self, model, layers):
            """The stream enters layer 0 from the input block; every layer's four RMS norms are
            over it (the post-norms over o / fc2 outputs, whose removed rows are zero); both output
            projections read it. RoPE acts inside the heads, not on the stream."""
            d = int(model.config.hidden_size)
            norms = tuple(Norm(f"{lp}.{n}") for lp in layers for n in (
                "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"))
            return Residual(d, (layers[0],), ("model.input_ff_layer.output_layer", "model.input_ff_layer.residual_layer"),
                            tuple(f"{h}.{x}" for h in ("output_projection_point", "output_projection_quantiles")
                                  for x in ("input_layer", "residual_layer")), (), norms)

        def loss(self, model, context, target):
            target = trained_part(target, self.prediction_length(model))
            return model(past_values=context, future_values=target).loss

        @torch.no_grad()
        def predict(self, model, context, horizon):
            return roll_out(lambda ctx: model(past_values=ctx).mean_predictions, context, horizon)
