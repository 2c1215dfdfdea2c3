"""TimesFM family: transformers ``TimesFmModelForPrediction`` (TimesFM 1.0 / 2.0) and
``TimesFm2_5ModelForPrediction`` (TimesFM 2.5).

Stage of the flow: model -> **adapter** -> mask sites / coupled plan / restructured model.
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


def _zero_scores(query, key):
    """No q/k dim left: q.k == 0 for every pair (the masked model's scores)."""
    return query.new_zeros((*query.shape[:-1], 1)), key.new_zeros((*key.shape[:-1], 1))


class PrunedTimesFmAttention(TimesFmAttention):
    """TimesFmAttention with per-layer ``num_heads``, q/k ``head_dim``, v/o ``v_head_dim`` and a
    per-head per-dim ``scaling`` [num_heads * head_dim]; ``orig_head_dim`` sizes the constant."""

    def _scale_query(self, query: torch.Tensor) -> torch.Tensor:
        scale = F.softplus(self.scaling).mul(1.442695041 / math.sqrt(self.orig_head_dim))
        return query * scale.view(1, self.num_heads, 1, self.head_dim)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        n_heads, d_qk, d_v = self.num_heads, self.head_dim, self.v_head_dim
        query = self.q_proj(hidden_states).view(*input_shape, n_heads, d_qk).transpose(1, 2)
        key = self.k_proj(hidden_states).view(*input_shape, n_heads, d_qk).transpose(1, 2)
        value = self.v_proj(hidden_states).view(*input_shape, n_heads, d_v).transpose(1, 2)
        if n_heads == 0:
            return self.o_proj(hidden_states.new_zeros((*input_shape, 0))), None
        if d_qk == 0:
            query, key = _zero_scores(query, key)
        else:
            query = self._scale_query(query)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, simple_eager_attention_forward
        )
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=1.0,
            **kwargs,
        )
        out = out.reshape(*input_shape, n_heads * d_v).contiguous()
        return self.o_proj(out), weights


if TimesFm2_5ModelForPrediction is not None:

    class PrunedTimesFm2_5Attention(TimesFm2_5Attention):
        """TimesFm2_5Attention with per-layer ``num_heads`` and v/o ``v_head_dim`` (q/k keep the full
        ``head_dim``, so RoPE, q/k norms and the per-dim scaling are unchanged)."""

        def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
            if cache is None:
                cache = kwargs.pop("past_key_values", None)
            input_shape = hidden_states.shape[:-1]
            n_heads, d_qk, d_v = self.num_heads, self.head_dim, self.v_head_dim
            query = self.q_proj(hidden_states).view(*input_shape, n_heads, d_qk).transpose(1, 2)
            key = self.k_proj(hidden_states).view(*input_shape, n_heads, d_qk).transpose(1, 2)
            value = self.v_proj(hidden_states).view(*input_shape, n_heads, d_v).transpose(1, 2)
            if n_heads == 0:
                return self.o_proj(hidden_states.new_zeros((*input_shape, 0))), None
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            query = self.q_norm(query)
            key = self.k_norm(key)
            scale = F.softplus(self.scaling).mul(1.442695041 / math.sqrt(self.head_dim))
            query = query * scale[None, None, None, :]
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_2_5)
            out, weights = attention(
                self,
                query,
                key,
                value,
                attention_mask,
                dropout=self.attention_dropout if self.training else 0.0,
                scaling=1.0,
                **kwargs,
            )
            out = out.reshape(*input_shape, n_heads * d_v).contiguous()
            return self.o_proj(out), weights


class _TimesFmBase(Adapter):
    """Shared sites / plan of both TimesFM generations; subclasses name the modules."""

    layer_cls: type = nn.Module
    pruned_cls: type = nn.Module
    up, down = "mlp.gate_proj", "mlp.down_proj"
    qk_full = False

    def __init__(self, model: nn.Module, *, block=1, heads: bool = False, freq: int = 0):
        """freq: TimesFM frequency id of the series (0 high, 1 medium, 2 low); 1.0/2.0 only."""
        super().__init__(model, block=block, heads=heads)
        self.freq = int(freq)

    @staticmethod
    def prediction_length(model) -> int:
        """Steps one forward pass forecasts (``horizon_length``; the longest target the loss trains on)."""
        return int(model.config.horizon_length)

    def _layers(self, model) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, self.layer_cls)]

    @staticmethod
    def _proj(lp: str) -> dict[str, str]:
        ap = f"{lp}.self_attn"
        return {"q": f"{ap}.q_proj", "k": f"{ap}.k_proj", "v": f"{ap}.v_proj", "o": f"{ap}.o_proj"}

    @staticmethod
    def _heads(att) -> tuple[int, int]:
        return att.q_proj.out_features // att.head_dim, att.head_dim

    def _act(self, mlp):
        return F.relu

    def _kinds(self) -> tuple[str, str]:
        return f"ffn.{self.up.split('.')[-1]}", f"ffn.{self.down.split('.')[-1]}"

    def sites(self, model: nn.Module) -> list[Site]:
        refuse_repacked(model, (self.pruned_cls,))
        rb = resolve_block(self.block, "residual", resolve_block(self.block, "ffn"))
        ku, kd = self._kinds()
        sites: list[Site] = []
        for i, lp in enumerate(self._layers(model)):
            att = model.get_submodule(f"{lp}.self_attn")
            n_heads, head_dim = self._heads(att)
            layer = f"decoder.{i}"
            sites += attention_sites(
                model, self._proj(lp), n_heads, head_dim,
                heads=self.heads, residual_block=rb, layer=layer, kind="self_attn",
            )
            sites += ffn_sites(
                model, {ku: f"{lp}.{self.up}"}, (kd, f"{lp}.{self.down}"),
                block=self.block, residual_block=rb, layer=layer,
            )
        return sites

    def plan(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> Plan:
        by_path = {s.path: s for s in self.sites(model)}
        plan = Plan(family=self.family, extra={"heads": {}, "ffn": {}})
        pb = PlanBuilder(plan)
        for lp in self._layers(model):
            ap = f"{lp}.self_attn"
            att = model.get_submodule(ap)
            n_heads, head_dim = self._heads(att)
            hp = plan_attention(model, pb, by_path, masks, self._proj(lp), n_heads, head_dim, qk_full=self.qk_full)
            self._plan_attention_extras(plan, pb, ap, att, hp)
            plan.extra["heads"][ap] = hp.heads
            mlp = model.get_submodule(f"{lp}.{self.up.rsplit('.', 1)[0]}")
            keep = plan_ffn(
                model, pb, by_path, masks, act=self._act(mlp), up=f"{lp}.{self.up}", down=f"{lp}.{self.down}"
            )
            plan.extra["ffn"][f"{lp}.{self.up.rsplit('.', 1)[0]}"] = len(keep)
        return plan

    def _plan_attention_extras(self, plan, pb, ap, att, hp) -> None:
        raise NotImplementedError

    def apply_plan(self, model: nn.Module, plan: Plan) -> None:
        apply_linears(model, plan)
        for ap, attrs in plan.attrs.items():
            att = model.get_submodule(ap)
            if not isinstance(att, self.pruned_cls):
                att.__class__ = self.pruned_cls
            for k, v in attrs.items():
                setattr(att, k, int(v))
        for key, shape in plan.params.items():
            path, _, name = key.rpartition(".")
            mod = model.get_submodule(path)
            old = getattr(mod, name)
            setattr(mod, name, nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                            requires_grad=old.requires_grad))


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

    def _plan_attention_extras(self, plan, pb, ap, att, hp) -> None:
        orig = getattr(att, "orig_head_dim", att.head_dim)
        plan.attrs[ap] = {
            "num_heads": len(hp.heads),
            "head_dim": hp.qk_dim,
            "v_head_dim": hp.v_dim,
            "orig_head_dim": orig,
            "q_size": len(hp.heads) * hp.qk_dim,
            "kv_size": len(hp.heads) * hp.qk_dim,
        }
        # per-head per-dim query scaling, gathered from the shared [head_dim] vector
        rows = [d for dims in hp.qk_dims for d in dims]
        pb.param(f"{ap}.scaling", [len(rows)], rows, None)

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
        outs, ctx, left = [], context, horizon
        while left > 0:
            y = self._forward(model, ctx).mean_predictions
            outs.append(y[:, :left])
            left -= y.shape[-1]
            ctx = torch.cat([ctx, y.to(ctx.dtype)], dim=-1)
        return torch.cat(outs, dim=-1)


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
        up, down = "mlp.fc1", "mlp.fc2"
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

        def _plan_attention_extras(self, plan, pb, ap, att, hp) -> None:
            plan.attrs[ap] = {"num_heads": len(hp.heads), "head_dim": hp.qk_dim or att.head_dim, "v_head_dim": hp.v_dim}

        def loss(self, model, context, target):
            target = trained_part(target, self.prediction_length(model))
            return model(past_values=context, future_values=target).loss

        @torch.no_grad()
        def predict(self, model, context, horizon):
            outs, ctx, left = [], context, horizon
            while left > 0:
                y = model(past_values=ctx).mean_predictions
                outs.append(y[:, :left])
                left -= y.shape[-1]
                ctx = torch.cat([ctx, y.to(ctx.dtype)], dim=-1)
            return torch.cat(outs, dim=-1)
