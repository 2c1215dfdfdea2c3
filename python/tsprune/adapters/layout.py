"""The one engine behind every model family: a family describes its structure as DATA (a
``Layout``) and this module derives from it the mask sites, the coupled plan and the in-place
restructuring.

Stage of the flow: model -> **adapter** (layout -> sites / plan / apply_plan). Receives a model of
one family and the family's ``Layout`` of it; hands on ``Site`` lists (what the Pruner masks),
``Plan`` objects (keep indices, new shapes, attribute updates; JSON) and restructured models. It
touches only the modules the layout names (and, on apply, the model it is given).

A layout is a tuple of ``Block`` (one heatmap row each: ``layer``), each holding

* ``Attention`` groups: the attention module, its q / k / v / o Linears, heads x head dim, which
  module attributes size its reshapes (``sizes``: attribute -> quantity), and the true special
  cases as named fields: ``qk_full`` (q/k normalised over the head: kept heads keep every q/k dim),
  ``rope`` (rotate_half pairs dim j with j + head_dim / 2: pairs are kept or dropped together and
  each head keeps its pairs' original frequencies), ``head_params`` (a parameter [head_dim] shared
  by the heads, e.g. TimesFM's per-dim query scaling, that becomes per head [heads x q/k dim]);
* ``FFN`` groups: up (and gate) -> activation -> down, with the kinds the heatmap shows;
* ``SharedHeadTable`` hooks: a per-head table owned by one attention and sliced by several (T5's
  relative-position bias, computed in block 0 and passed down the stack). It is planned after the
  block that holds it (the block of its last user), so every user's heads are known.

Every rule of liveness and coupling is in ``_common`` (module docstring there); this module only
walks the layout. Plans are the same JSON as each family wrote by hand before (same keys, same
order), so saved models load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ._common import (
    PlanBuilder,
    _pad,
    apply_linears,
    attention_sites,
    ffn_sites,
    linear_live,
    plan_ffn,
    plan_heads,
    refuse_repacked,
    resolve_block,
)
from .base import Adapter, Plan, Site

#: quantities an attention's ``sizes`` may name (values written to plan.attrs)
SIZES = ("heads", "qk_dim", "v_dim", "qk_inner", "orig_qk_dim")


@dataclass(frozen=True)
class RoPE:
    """Rotary embedding with ``rotate_half`` pairing inside each head (dim j with j + head_dim/2).

    inv_freq: attribute path, relative to the attention module, of the model's inv_freq
    [head_dim / 2] float buffer; buffer: the name under which the restructured attention gets its
    per-head frequencies [heads, qk_dim / 2] float32 (non-persistent, rebuilt from
    ``plan.extra["rope_pairs"]`` on apply)."""

    inv_freq: str
    buffer: str = "rope_inv_freq"


@dataclass(frozen=True)
class Attention:
    """One multi-head attention module.

    path: module path; kind: heatmap / site kind prefix (``"self_attn"`` -> ``self_attn.q`` ...);
    n_heads x head_dim: the ORIGINAL heads; proj: attribute names of the q, k, v, o Linears;
    sizes: (module attribute, quantity) pairs written to ``plan.attrs[path]`` in this order, a
    quantity being one of ``SIZES`` (kept heads, uniform q/k head dim, uniform v/o head dim,
    heads x q/k dim, the original head dim)."""

    path: str
    kind: str
    n_heads: int
    head_dim: int
    sizes: tuple[tuple[str, str], ...]
    proj: tuple[str, str, str, str] = ("q", "k", "v", "o")
    qk_full: bool = False
    rope: RoPE | None = None
    head_params: tuple[str, ...] = ()

    def linear(self, role: str) -> str:
        """Path of the ``role`` ("q", "k", "v" or "o") Linear."""
        return f"{self.path}.{self.proj['qkvo'.index(role)]}"


@dataclass(frozen=True)
class FFN:
    """down(act(up x)), or with ``gate``: down(act(gate x) * up x). ``path`` is the module whose kept
    width ``plan.extra["ffn"]`` records; up / gate / down are (site kind, Linear path)."""

    path: str
    up: tuple[str, str]
    down: tuple[str, str]
    act: Callable[[torch.Tensor], torch.Tensor]
    gate: tuple[str, str] | None = None

    def ups(self) -> dict[str, str]:
        """kind -> path of the projections into the hidden channels, in site order (gate first)."""
        return dict([self.gate, self.up] if self.gate else [self.up])


@dataclass(frozen=True)
class SharedHeadTable:
    """Hook for a per-head table shared by several attentions (T5's relative-position bias).

    owner: the attention holding the table (``owner.param`` is an nn.Embedding [buckets, n_heads]);
    users: the attentions slicing it. Planned: the table keeps the union of its users' kept heads
    (``extra["bias_tables"][owner]``) and each user gets the positions of its own heads in it
    (``extra["bias_heads"][user]``, set on apply as the non-persistent LongTensor buffer
    ``bias_heads``)."""

    owner: str
    users: tuple[str, ...]
    param: str = "relative_attention_bias"


@dataclass(frozen=True)
class Block:
    layer: str
    attentions: tuple[Attention, ...] = ()
    ffns: tuple[FFN, ...] = ()
    tables: tuple[SharedHeadTable, ...] = ()

    def linears(self) -> list[str]:
        """Paths of every Linear of the block's groups, in site order."""
        return [a.linear(r) for a in self.attentions for r in "qkvo"] + \
            [p for f in self.ffns for p in (*f.ups().values(), f.down[1])]


@dataclass(frozen=True)
class Layout:
    """A family's structure. attention_cls: the class a restructured attention takes (a subclass
    of the model's own attention class whose forward accepts per-layer q/k and v/o head dims);
    extra: the keys of ``plan.extra``, in order."""

    blocks: tuple[Block, ...]
    attention_cls: type | None = None
    extra: tuple[str, ...] = ("heads", "ffn")

    def attentions(self) -> dict[str, Attention]:
        return {a.path: a for b in self.blocks for a in b.attentions}


def check_layout(layout: Layout, model: nn.Module) -> None:
    """Raise ValueError where ``layout`` does not describe ``model``: a path that is not a Linear of
    the stated width, an unknown size quantity, an attention class the engine cannot adopt, a
    shared table or plan.extra key missing. Every adapter's sites() runs it, so a new family's
    layout is checked on first use (and by the conformance table, tests/pipeline/test_adapters.py)."""
    def linear(path: str, what: str) -> nn.Linear:
        try:
            lin = model.get_submodule(path)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"layout: {what} {path!r} is not an nn.Linear of the model")
        return lin

    attns = set(layout.attentions())
    for blk in layout.blocks:
        for a in blk.attentions:
            width = a.n_heads * a.head_dim
            for r in "qkvo":
                lin = linear(a.linear(r), f"{a.kind}.{r}")
                got = lin.in_features if r == "o" else lin.out_features
                if got != width:
                    raise ValueError(f"layout: {a.linear(r)} has {got} head channels, not {a.n_heads} x {a.head_dim}")
            bad = [q for _, q in a.sizes if q not in SIZES]
            if bad or not any(q == "heads" for _, q in a.sizes):
                raise ValueError(f"layout: {a.path} sizes must name 'heads' and only {SIZES}, got {a.sizes}")
            cls = layout.attention_cls
            if cls is not None and not issubclass(cls, type(model.get_submodule(a.path))):
                raise ValueError(f"layout: {cls.__name__} is not a subclass of {a.path}'s class")
            if a.rope is not None and (a.head_dim % 2 or "rope_pairs" not in layout.extra
                                       or not any(q == "qk_dim" for _, q in a.sizes)):
                raise ValueError(f"layout: {a.path} has RoPE pairs: needs an even head dim, a 'qk_dim' size "
                                 "and extra 'rope_pairs'")
            for name in a.head_params:
                p = getattr(model.get_submodule(a.path), name, None)
                if not isinstance(p, nn.Parameter) or tuple(p.shape) != (a.head_dim,):
                    raise ValueError(f"layout: {a.path}.{name} is not a parameter [head_dim]")
        for f in blk.ffns:
            ups = [linear(p, k) for k, p in f.ups().items()]
            down = linear(f.down[1], f.down[0])
            if any(u.out_features != down.in_features for u in ups):
                raise ValueError(f"layout: {f.path} up / down widths differ")
        for t in blk.tables:
            if not set(t.users) <= attns or not isinstance(model.get_submodule(f"{t.owner}.{t.param}"), nn.Embedding):
                raise ValueError(f"layout: shared table {t.owner}.{t.param} must be an Embedding used by attentions")
            if not {"bias_heads", "bias_tables"} <= set(layout.extra):
                raise ValueError("layout: shared tables need extra 'bias_heads' and 'bias_tables'")
    if not {"heads", "ffn"} <= set(layout.extra):
        raise ValueError(f"layout: extra must hold 'heads' and 'ffn', got {layout.extra}")
    paths = [p for b in layout.blocks for p in b.linears()]
    if len(set(paths)) != len(paths):
        raise ValueError("layout: a Linear appears in more than one group")


# -- sites --------------------------------------------------------------------------------------
def layout_sites(layout: Layout, model: nn.Module, *, block, heads: bool) -> list[Site]:
    """Every Site of the layout: per block its attentions (q, k, v, o) then its FFNs (gate, up,
    down). Residual sides use the "residual" block (default: the FFN block where it divides)."""
    rb = resolve_block(block, "residual", resolve_block(block, "ffn"))
    sites: list[Site] = []
    for blk in layout.blocks:
        for a in blk.attentions:
            sites += attention_sites(
                model, {r: a.linear(r) for r in "qkvo"}, a.n_heads, a.head_dim,
                heads=heads, residual_block=rb, layer=blk.layer, kind=a.kind,
            )
        for f in blk.ffns:
            sites += ffn_sites(model, f.ups(), f.down, block=block, residual_block=rb, layer=blk.layer)
    return sites


# -- plan ---------------------------------------------------------------------------------------
def layout_plan(layout: Layout, model: nn.Module, masks: dict[str, torch.Tensor], sites: list[Site],
                family: str) -> Plan:
    """Coupled keep indices, shapes and attributes of every group of the layout (docs/METHOD.md).

    masks: mask name -> 1-D mask (any float; 0 = pruned); sites: the sites the masks belong to (a
    Linear with no site, or a side with no mask, counts as fully alive)."""
    by_path = {s.path: s for s in sites}
    for blk in layout.blocks:  # unmasked Linears of the layout: every channel alive
        for path in blk.linears():
            by_path.setdefault(path, Site(path, None, None, blk.layer, ""))
    plan = Plan(family=family, extra={k: {} for k in layout.extra})
    pb = PlanBuilder(plan)
    kept: dict[str, list[int]] = {}
    for blk in layout.blocks:
        for a in blk.attentions:
            kept[a.path] = _plan_attention(model, pb, plan, by_path, masks, a)
        for f in blk.ffns:
            keep = plan_ffn(model, pb, by_path, masks, act=f.act, up=f.up[1], down=f.down[1],
                            gate=f.gate[1] if f.gate else None)
            plan.extra["ffn"][f.path] = len(keep)
        for t in blk.tables:
            _plan_table(model, pb, plan, t, kept)
    return plan


def _plan_attention(model, pb: PlanBuilder, plan: Plan, by_path, masks, a: Attention) -> list[int]:
    lq, lk, lv, lo = (linear_live(model, by_path[a.linear(r)], masks) for r in "qkvo")
    hp = plan_heads(a.n_heads, a.head_dim, lq.out & lk.out, lv.out & lo.inp, qk_full=a.qk_full)
    qk_rows, qk_dim = hp.qk_rows, hp.qk_dim
    if a.rope is not None:
        qk_rows, qk_dim, plan.extra["rope_pairs"][a.path] = _rope_rows(a, lq.out, lk.out, hp.heads)
    pb.linear(model, a.linear("q"), qk_rows, None, zero=not bool(lq.inp.any()))
    pb.linear(model, a.linear("k"), qk_rows, None, zero=not bool(lk.inp.any()))
    pb.linear(model, a.linear("v"), hp.v_rows, None, zero=not bool(lv.inp.any()))
    pb.linear(model, a.linear("o"), None, hp.v_rows, zero=not bool(lo.inp.any()))
    n = len(hp.heads)
    value = {"heads": n, "qk_dim": qk_dim, "v_dim": hp.v_dim, "qk_inner": n * qk_dim, "orig_qk_dim": a.head_dim}
    plan.attrs[a.path] = {name: value[q] for name, q in a.sizes}
    for name in a.head_params:  # [head_dim] shared by the heads -> per kept head, its own q/k dims
        rows = [d for dims in hp.qk_dims for d in dims]
        pb.param(f"{a.path}.{name}", [len(rows)], rows, None)
    plan.extra["heads"][a.path] = hp.heads
    return hp.heads


def _rope_rows(a: Attention, q_out: torch.Tensor, k_out: torch.Tensor, heads: list[int]):
    """RoPE pair coupling: q_rot[j] mixes q[j] and q[j + d/2], so pair j contributes to q.k iff some
    q dim and some k dim of it are alive. A kept pair keeps both dims; the head lays its pairs out
    as [first halves | second halves] (rotate_half still pairs them). Dead pairs pad heads to the
    uniform pair count (their q or k rows are zero after folding).
    Returns (q/k rows, q/k head dim, kept pair indices per kept head)."""
    d, half = a.head_dim, a.head_dim // 2
    pair = q_out.reshape(a.n_heads, 2, half).any(1) & k_out.reshape(a.n_heads, 2, half).any(1)
    m = max((int(pair[h].sum()) for h in heads), default=0)
    rows, pairs = [], []
    for h in heads:
        js = _pad([j for j in range(half) if pair[h, j]], [j for j in range(half) if not pair[h, j]], m)
        pairs.append(js)
        rows += [h * d + j for j in js] + [h * d + half + j for j in js]
    return rows, 2 * m, pairs


def _plan_table(model, pb: PlanBuilder, plan: Plan, t: SharedHeadTable, kept: dict[str, list[int]]) -> None:
    table = model.get_submodule(f"{t.owner}.{t.param}").weight
    union = sorted(set().union(*(kept[u] for u in t.users))) if t.users else []
    cols = None if union == list(range(table.shape[1])) else union
    pb.param(f"{t.owner}.{t.param}.weight", [table.shape[0], len(union)], None, cols)
    plan.extra["bias_tables"][t.owner] = union
    pos = {h: j for j, h in enumerate(union)}
    for u in t.users:
        plan.extra["bias_heads"][u] = [pos[h] for h in kept[u]]


# -- restructure ---------------------------------------------------------------------------------
def adopt_class(module: nn.Module, cls: type | None) -> None:
    """Give ``module`` the forward of ``cls``, a subclass of its own class that reads per-layer
    shapes from attributes. The one place tsprune swaps a module's class: the HF forwards view q/k
    and v with one head dim, so separate q/k and v/o dims need a forward of their own, while every
    parameter, buffer, hook and attribute of the module stays where the model's code expects it."""
    if cls is None or isinstance(module, cls):
        return
    if not issubclass(cls, type(module)):
        raise ValueError(f"{type(module).__name__} cannot be restructured as {cls.__name__}")
    module.__class__ = cls


def layout_apply(layout: Layout, model: nn.Module, plan: Plan, family: str) -> None:
    """Restructure ``model`` (unpruned, of the layout's shapes) in place to ``plan``: new empty
    Linears (or ZeroLinears), the pruned attention class with the planned attributes, per-head
    parameters and buffers, resized shared tables. Values are undefined afterwards (repack copies
    gathered values in, load loads a state dict)."""
    apply_linears(model, plan)
    attns = layout.attentions()
    for ap, attrs in plan.attrs.items():
        a = attns.get(ap)
        if a is None:
            raise ValueError(f"{family} plan: attrs.{ap} is not an attention module of the model")
        att = model.get_submodule(ap)
        adopt_class(att, layout.attention_cls)
        for k, v in attrs.items():
            setattr(att, k, int(v))
        for name in a.head_params:
            key = f"{ap}.{name}"
            if key in plan.params:
                old = getattr(att, name)
                setattr(att, name, nn.Parameter(torch.empty(plan.params[key], dtype=old.dtype, device=old.device),
                                                requires_grad=old.requires_grad))
        if a.rope is not None:
            _apply_rope(att, a, plan, family)
    for blk in layout.blocks:
        for t in blk.tables:
            _apply_table(model, t, plan)


def _apply_rope(att: nn.Module, a: Attention, plan: Plan, family: str) -> None:
    pairs_all = plan.extra.get("rope_pairs", {})
    if not isinstance(pairs_all, dict):
        raise ValueError(f"{family} plan: extra.rope_pairs must be an object (attention path -> pairs per head)")
    pairs = pairs_all.get(a.path)
    size = {q: int(plan.attrs[a.path][name]) for name, q in a.sizes}
    n, qk_dim = size["heads"], size["qk_dim"]
    half = qk_dim // 2
    ok = (
        isinstance(pairs, list) and len(pairs) == n and qk_dim % 2 == 0
        and all(isinstance(js, list) and len(js) == half for js in pairs)
        and all(type(j) is int and 0 <= j < a.head_dim // 2 for js in pairs for j in js)
    )
    if not ok:
        raise ValueError(f"{family} plan: extra.rope_pairs.{a.path} must list {n} heads x {half} rotary pair "
                         f"indices in [0, {a.head_dim // 2})")
    base = att.get_submodule(a.rope.inv_freq.rpartition(".")[0]) if "." in a.rope.inv_freq else att
    inv = getattr(base, a.rope.inv_freq.rpartition(".")[2]).detach().float()
    idx = torch.tensor(pairs, dtype=torch.long, device=inv.device).reshape(n, half)
    att.register_buffer(a.rope.buffer, inv[idx], persistent=False)


def _apply_table(model: nn.Module, t: SharedHeadTable, plan: Plan) -> None:
    key = f"{t.owner}.{t.param}.weight"
    if key in plan.params:
        shape = plan.params[key]
        w = model.get_submodule(f"{t.owner}.{t.param}").weight
        new = torch.nn.utils.skip_init(nn.Embedding, shape[0], shape[1], device=w.device, dtype=w.dtype)
        setattr(model.get_submodule(t.owner), t.param, new)
    dev = next((p.device for p in model.get_submodule(t.owner).parameters()), torch.device("cpu"))
    for u in t.users:
        idx = plan.extra.get("bias_heads", {}).get(u)
        model.get_submodule(u).register_buffer(
            "bias_heads", None if idx is None else torch.tensor(idx, dtype=torch.long, device=dev), persistent=False
        )


# -- the adapter ---------------------------------------------------------------------------------
class LayoutAdapter(Adapter):
    """An Adapter whose sites, plan and restructuring all come from ``layout(model)``; a family
    subclass writes ``layout`` plus its objective (``loss``, ``predict``, ``prediction_length``)."""

    def layout(self, model: nn.Module) -> Layout:
        """The family's structure of ``model`` (an unpruned model of the family)."""
        raise NotImplementedError

    def _checked_layout(self, model: nn.Module) -> Layout:
        refuse_repacked(model)  # before the layout reads shapes that repack changed
        lay = self.layout(model)
        check_layout(lay, model)
        return lay

    def sites(self, model: nn.Module) -> list[Site]:
        return layout_sites(self._checked_layout(model), model, block=self.block, heads=self.heads)

    def plan(self, model: nn.Module, masks: dict[str, torch.Tensor], sites: list[Site] | None = None) -> Plan:
        lay = self._checked_layout(model)
        if sites is None:
            sites = layout_sites(lay, model, block=self.block, heads=self.heads)
        return layout_plan(lay, model, masks, sites, self.family)

    def apply_plan(self, model: nn.Module, plan: Plan) -> None:
        layout_apply(self.layout(model), model, plan, self.family)


__all__ = [
    "Attention", "Block", "FFN", "Layout", "LayoutAdapter", "RoPE", "SharedHeadTable", "adopt_class", "check_layout",
    "layout_apply", "layout_plan", "layout_sites",
]
