"""T5 encoder-decoder family: Chronos-Bolt (default model of tsprune) and classic Chronos.

Stage of the flow: model -> **adapter** -> mask sites / coupled plan / restructured model; this file
holds the family's layout and objective, the engine (layout.py) derives the rest.
Receives a ``ChronosBoltModelForForecasting`` (chronos-forecasting), or classic Chronos: a
``ChronosModel`` wrapping a ``T5ForConditionalGeneration``, or that T5 alone with ``chronos_config``
in its config (as a Chronos checkpoint loads); hands on its sites (every q, k, v, o of SelfAttention and
EncDecAttention, every DenseReluDense wi / wi_0 / wi_1 / wo, encoder and decoder), a plan from mask
values, and the in-place restructuring for repack and load. It touches only the T5 stacks.

Repacked attention (``PrunedT5Attention``, a T5Attention whose forward accepts per-layer shapes):

* heads are removed per layer; q/k and v/o keep *separate* uniform head dims (each the largest number
  of surviving dims among the layer's kept heads; a head with fewer pads with its own pruned dims,
  whose folded weights are zero, so the result is exact). No max(q/k, v/o) padding is needed.
* relative position bias: T5 computes it once, in block 0 of a stack, and passes it to later
  blocks. After repack, block 0's table keeps the columns of the heads kept by *any* self-attention
  layer of that stack (in original order); every self-attention layer holds ``bias_heads`` (a
  non-persistent index buffer into those columns) and slices the shared bias to its own heads, so
  each layer gets the bias of its heads computed from the original shared embedding. No 1/sqrt(d)
  scaling, as in T5.
* a layer with no head left computes o(empty) = 0 (o is a ZeroLinear); a layer whose heads have no
  q/k dim left attends with scores = position bias only (q.k = 0), exactly as the masked model.
* decoder self-attention over one token is kept as is (it adds o(v(x)); it is not zero).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import (
    ALL_ATTENTION_FUNCTIONS,
    T5Attention,
    T5DenseGatedActDense,
    T5LayerNorm,
    T5Stack,
    eager_attention_forward,
)

from . import register
from ._common import median_index, trained_part
from .attention import split_heads, zero_scores
from .layout import FFN, Attention, Block, Layout, LayoutAdapter, Residual, SharedHeadTable, stream_modules


class PrunedT5Attention(T5Attention):
    """T5Attention with per-layer head count, separate q/k and v/o head dims and its own slice of
    the stack's shared relative position bias. Attributes set by the adapter's apply_plan:
    ``n_heads``, ``key_value_proj_dim`` (q/k head dim), ``v_head_dim``, ``inner_dim`` and the
    buffer ``bias_heads`` (absent for cross-attention, which has a zero bias in T5)."""

    def forward(
        self,
        hidden_states,
        mask=None,
        key_value_states=None,
        position_bias=None,
        cache=None,
        **kwargs,
    ):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        n_heads, d_qk, d_v = self.n_heads, self.key_value_proj_dim, self.v_head_dim
        past_seen = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        past_seen = past_seen.clone() if isinstance(past_seen, torch.Tensor) else past_seen
        is_cross = key_value_states is not None

        query = split_heads(self.q(hidden_states), n_heads, d_qk)

        is_updated = False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            curr_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        else:
            curr_cache = cache
        current = key_value_states if is_cross else hidden_states
        if is_cross and cache is not None and is_updated:
            key = curr_cache.layers[self.layer_idx].keys
            value = curr_cache.layers[self.layer_idx].values
        else:
            key = split_heads(self.k(current), n_heads, d_qk)
            value = split_heads(self.v(current), n_heads, d_v)
            if cache is not None:
                key, value = curr_cache.update(key, value, self.layer_idx, kwargs=kwargs)
                if is_cross and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True
        q_len, k_len = input_shape[1], key.shape[-2]

        # The stack passes one bias between its layers (computed by block 0 over the table's
        # columns); each layer takes its own heads from it.
        shared = position_bias
        bias_heads = getattr(self, "bias_heads", None)  # set by the SharedHeadTable hook
        if bias_heads is not None and (shared is not None or self.has_relative_attention_bias):
            if shared is None:
                shared = self.compute_bias(q_len, k_len, device=query.device, past_seen_tokens=past_seen)
            bias = shared.index_select(1, bias_heads.to(shared.device))
        else:
            bias = torch.zeros((1, n_heads, q_len, k_len), device=query.device, dtype=query.dtype)

        if n_heads == 0:
            out = hidden_states.new_zeros((*input_shape, 0))
            weights = None
        else:
            if d_qk == 0:  # no q/k dim left: q.k == 0, scores are the bias alone
                query, key = zero_scores(query, key)
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            out, weights = attention(
                self,
                query,
                key,
                value,
                mask,
                dropout=0.0 if not self.training else self.dropout,
                scaling=self.scaling,
                position_bias=bias,
                **kwargs,
            )
            out = out.reshape(*input_shape, n_heads * d_v).contiguous()
        return self.o(out), shared, weights


_T5_SIZES = (("n_heads", "heads"), ("key_value_proj_dim", "qk_dim"), ("v_head_dim", "v_dim"), ("inner_dim", "qk_inner"))


class T5Adapter(LayoutAdapter):
    """The layout of every T5Stack in a model (encoder and decoder): per block, self-attention
    (and in the decoder cross-attention), then the DenseReluDense FFN; the stack's relative-position
    table (block 0) is a SharedHeadTable of its self-attentions."""

    family = "t5"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False  # only the Chronos subclasses below are registered

    @staticmethod
    def _stacks(model: nn.Module) -> list[tuple[str, T5Stack]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, T5Stack)]

    def layout(self, model: nn.Module) -> Layout:
        blocks: list[Block] = []
        for sp, stack in self._stacks(model):
            label = sp.rsplit(".", 1)[-1]
            first = len(blocks)
            for i, blk in enumerate(stack.block):
                base = f"{sp}.block.{i}.layer"
                attns = [(f"{base}.0.SelfAttention", "self_attn")]
                if blk.is_decoder:
                    attns.append((f"{base}.1.EncDecAttention", "cross_attn"))
                fp = f"{base}.{len(blk.layer) - 1}.DenseReluDense"
                ffn = model.get_submodule(fp)
                if isinstance(ffn, T5DenseGatedActDense):  # wo(act(wi_0 x) * wi_1 x)
                    f = FFN(fp, ("ffn.wi_1", f"{fp}.wi_1"), ("ffn.wo", f"{fp}.wo"), ffn.act, gate=("ffn.wi_0", f"{fp}.wi_0"))
                else:  # wo(act(wi x))
                    f = FFN(fp, ("ffn.wi", f"{fp}.wi"), ("ffn.wo", f"{fp}.wo"), ffn.act)
                blocks.append(Block(f"{label}.{i}", tuple(
                    Attention(ap, kind, model.get_submodule(ap).n_heads, model.get_submodule(ap).key_value_proj_dim,
                              _T5_SIZES) for ap, kind in attns
                ), (f,)))
            owner = f"{sp}.block.0.layer.0.SelfAttention"
            if len(blocks) > first and getattr(model.get_submodule(owner), "has_relative_attention_bias", False):
                users = tuple(b.attentions[0].path for b in blocks[first:])
                last = blocks[-1]
                blocks[-1] = Block(last.layer, last.attentions, last.ffns, (SharedHeadTable(owner, users),))
        return Layout(tuple(blocks), PrunedT5Attention, extra=("heads", "bias_heads", "ffn", "bias_tables"),
                      residual=self._residual(model), gates=True)

    def _residual(self, model: nn.Module) -> Residual | None:
        """One stream width for the whole model (encoder, decoder and cross-attention share it): it
        enters each stack at block 0; every T5LayerNorm (RMS, no mean) is over it; the token
        embeddings write it; the family's own input / output maps are its writers / readers."""
        stacks = self._stacks(model)
        if not stacks:
            return None
        d = int(stacks[0][1].config.d_model)
        embs, norms = stream_modules(model, d, T5LayerNorm)
        writers, readers = self._stream_io(model)
        return Residual(d, tuple(f"{sp}.block.0" for sp, _ in stacks), writers, readers, embs, norms)

    def _stream_io(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(writers, readers): Linears outside the stacks whose outputs / inputs are the stream."""
        return (), ()


@register
class ChronosBoltAdapter(T5Adapter):
    """Chronos-Bolt (``ChronosBoltModelForForecasting``): quantile loss, median point forecast.

    loss: the model's own quantile loss on the first min(H, ``prediction_length``) target steps (a
    longer target trains on its first ``prediction_length`` steps, as the reference trains
    Chronos-Bolt at its own prediction length).
    predict: the median quantile; horizons beyond ``prediction_length`` go through Chronos-Bolt's own
    autoregressive rollout (``ChronosBoltPipeline.predict``: every quantile of the first block is
    appended to the context, the 9 x 9 continuations are reduced to 9 empirical quantiles, and so
    on), so the result is exactly the pipeline's median."""

    family = "chronos-bolt"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            from chronos.chronos_bolt import ChronosBoltModelForForecasting
        except ImportError:  # pragma: no cover - chronos-forecasting absent
            return False
        return isinstance(model, ChronosBoltModelForForecasting)

    @staticmethod
    def prediction_length(model) -> int:
        """Steps one forward pass forecasts (and the longest target the loss trains on)."""
        return int(model.chronos_config.prediction_length)

    def _stream_io(self, model):
        # input_patch_embedding writes the encoder stream (its optional T5LayerNorm is a stream
        # norm, found by _residual); output_patch_embedding reads the decoder's final norm output
        return (("input_patch_embedding.output_layer", "input_patch_embedding.residual_layer"),
                ("output_patch_embedding.hidden_layer", "output_patch_embedding.residual_layer"))

    def loss(self, model, context, target):
        return model(context=context, target=trained_part(target, self.prediction_length(model))).loss

    @torch.no_grad()
    def predict(self, model, context, horizon):
        p = self.prediction_length(model)
        mi = median_index(model.chronos_config.quantiles)
        if horizon <= p:
            return model(context=context).quantile_preds[:, mi, :horizon]
        from chronos.chronos_bolt import ChronosBoltPipeline

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pipeline warns about horizons beyond its length
            q = ChronosBoltPipeline(model).predict(context, prediction_length=horizon)
        return q[:, mi, :horizon].to(device=context.device, dtype=context.dtype)


@register
class ChronosAdapter(T5Adapter):
    """Classic Chronos: a ``chronos.ChronosModel`` around a T5ForConditionalGeneration, or the bare
    T5ForConditionalGeneration of a Chronos checkpoint (its config carries ``chronos_config``).

    loss: cross-entropy on the tokenised target (Chronos' mean-scale bins; a target shorter than
    ``prediction_length`` is padded with NaN = ignored tokens, a longer one trains on its first
    ``prediction_length`` steps).
    predict: median over ``num_samples`` sampled paths (``ChronosPipeline.predict``, which rolls out
    autoregressively beyond ``prediction_length`` by appending the sample median to the context);
    stochastic, as the model is (seed torch for a reproducible forecast)."""

    family = "chronos"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            from chronos.chronos import ChronosModel
        except ImportError:  # pragma: no cover
            return False
        if isinstance(model, ChronosModel):
            return bool(T5Adapter._stacks(model))
        from transformers import T5ForConditionalGeneration

        cc = getattr(getattr(model, "config", None), "chronos_config", None)
        return isinstance(model, T5ForConditionalGeneration) and isinstance(cc, dict) and "n_tokens" in cc

    @staticmethod
    def _parts(model):
        """(T5ForConditionalGeneration, ChronosConfig, ChronosModel) of either form."""
        from chronos.chronos import ChronosConfig, ChronosModel

        if isinstance(model, ChronosModel):
            return model.model, model.config, model
        cfg = ChronosConfig(**model.config.chronos_config)
        return model, cfg, ChronosModel(cfg, model)

    def prediction_length(self, model) -> int:
        """Steps one generate call forecasts (and the longest target the loss trains on)."""
        return int(self._parts(model)[1].prediction_length)

    def _stream_io(self, model):
        # the LM head reads the decoder's final norm output (times the constant d_model ** -0.5 of
        # the ORIGINAL width when tied, which repack leaves as is: config.d_model does not change)
        return (), tuple(n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "lm_head")

    def loss(self, model, context, target):
        t5, cfg, _ = self._parts(model)
        p = cfg.prediction_length
        target = trained_part(target, p)
        h = target.shape[-1]
        if h < p:
            pad = torch.full((*target.shape[:-1], p - h), float("nan"), dtype=target.dtype, device=target.device)
            target = torch.cat([target, pad], dim=-1)
        tok = cfg.create_tokenizer()
        ids, attn, scale = tok.context_input_transform(context.detach().float().cpu())
        labels, lmask = tok.label_input_transform(target.detach().float().cpu(), scale)
        labels[~lmask] = -100
        dev = next(t5.parameters()).device
        out = t5(input_ids=ids.to(dev), attention_mask=attn.to(dev), labels=labels.to(dev))
        return out.loss

    @torch.no_grad()
    def predict(self, model, context, horizon):
        from chronos.chronos import ChronosPipeline

        _, cfg, wrapped = self._parts(model)
        pipe = ChronosPipeline(tokenizer=cfg.create_tokenizer(), model=wrapped)
        samples = pipe.predict(context.detach().float().cpu(), prediction_length=horizon)
        return samples.median(dim=1).values[:, :horizon].to(device=context.device, dtype=context.dtype)
