"""The forward of a restructured attention: per-layer head count and separate q/k and v/o head dims.

Stage of the flow: repacked model (forward). The layout engine sets the per-layer sizes as module
attributes (``Attention.sizes``) and gives the module its family's pruned attention class
(``layout.adopt_class``); that class's forward calls ``heads_attention`` (transformers-style
attentions: PatchTST, PatchTSMixer, TimesFM 1.0/2.0/2.5) or uses the pieces below (T5, with its
caches and shared position bias; Chronos-2, with its own eager / SDPA kernels). Receives hidden
states [B, S, D]; hands on [B, S, D] (plus the attention weights where the model returns them).

Two cases no transformers forward handles, both exact w.r.t. the masked model:

* no head left: v and o have no rows / columns, o is a ZeroLinear: the output is o(empty) = its bias;
* heads left but no q/k dim: q.k = 0 for every pair, so the scores are the mask / bias alone; the
  attention runs on width-1 zero q and k.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def split_heads(x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """[B, S, n_heads * head_dim] -> [B, n_heads, S, head_dim] (a view)."""
    return x.view(*x.shape[:-1], n_heads, head_dim).transpose(1, 2)


def zero_scores(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k of width 1, all zeros: q.k == 0, what heads without a q/k dim compute."""
    return query.new_zeros((*query.shape[:-1], 1)), key.new_zeros((*key.shape[:-1], 1))


def heads_attention(
    mod: nn.Module,
    hidden: torch.Tensor,
    kv: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    proj: tuple[str, str, str, str],
    dims: tuple[int, int, int],
    attention: Callable,
    scaling: float,
    dropout: float,
    prepare: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    cache=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One restructured multi-head attention through a transformers attention interface.

    hidden [B, S, D] (queries), kv [B, T, D] or None (self-attention); proj: attribute names of the
    q, k, v, o Linears of ``mod``; dims: (heads, q/k head dim, v/o head dim); attention: the
    interface (``ALL_ATTENTION_FUNCTIONS`` entry or the model's eager function), called as
    ``attention(mod, q, k, v, mask, dropout=, scaling=, **kwargs)`` and returning
    ([B, S, heads, d_v], weights); prepare(q, k) -> (q, k): the family's rotary / norm / query
    scaling on [B, heads, S, d_qk] (skipped without q/k dims); cache: a transformers Cache updated
    with this layer's k, v. Returns (o(out) [B, S, D], weights or None)."""
    n_heads, d_qk, d_v = dims
    q_lin, k_lin, v_lin, o_lin = (getattr(mod, n) for n in proj)
    lead = hidden.shape[:-1]
    src = hidden if kv is None else kv
    query = split_heads(q_lin(hidden), n_heads, d_qk)
    key = split_heads(k_lin(src), n_heads, d_qk)
    value = split_heads(v_lin(src), n_heads, d_v)
    if n_heads == 0:
        return o_lin(hidden.new_zeros((*lead, 0))), None
    if d_qk == 0:
        query, key = zero_scores(query, key)
    elif prepare is not None:
        query, key = prepare(query, key)
    if cache is not None:
        key, value = cache.update(key, value, mod.layer_idx, kwargs=kwargs)
    out, weights = attention(mod, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return o_lin(out.reshape(*lead, n_heads * d_v).contiguous()), weights
