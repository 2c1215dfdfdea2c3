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

import math
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
    residual_spec,
    resolve_block,
)
from .base import Adapter, Plan, Point, Site

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
    gate_at: str | None = None  # module whose output[0] is the sub-block's residual contribution (default: path)
    gate_fold: str | None = None  # module absorbing a gate value on repack (default: the o Linear)

    def linear(self, role: str) -> str:
        """Path of the ``role`` ("q", "k", "v" or "o") Linear."""
        return f"{self.path}.{self.proj['qkvo'.index(role)]}"

    def linears(self) -> list[str]:
        return [self.linear(r) for r in "qkvo"]

    def gate_point(self, layer: str, width: int) -> "Point":
        return Point(f"{self.path}.gate", self.gate_at or self.path, "output", 1, width, layer,
                     f"{self.kind}.gate", self.fold())

    def fold(self) -> str:
        """The module absorbing a gate value on repack."""
        return self.gate_fold or self.linear("o")


@dataclass(frozen=True)
class FFN:
    """down(act(up x)), or with ``gate``: down(act(gate x) * up x). ``path`` is the module whose kept
    width ``plan.extra["ffn"]`` records; up / gate / down are (site kind, Linear path)."""

    path: str
    up: tuple[str, str]
    down: tuple[str, str]
    act: Callable[[torch.Tensor], torch.Tensor]
    gate: tuple[str, str] | None = None
    gate_at: str | None = None  # module whose output is the sub-block's residual contribution (default: path)
    gate_fold: str | None = None  # module absorbing a gate value on repack (default: the down Linear)

    def ups(self) -> dict[str, str]:
        """kind -> path of the projections into the hidden channels, in site order (gate first)."""
        return dict([self.gate, self.up] if self.gate else [self.up])

    def linears(self) -> list[str]:
        return [*self.ups().values(), self.down[1]]

    def gate_point(self, layer: str, width: int) -> "Point":
        return Point(f"{self.path}.gate", self.gate_at or self.path, "output", 1, width, layer, "ffn.gate",
                     self.fold())

    def fold(self) -> str:
        return self.gate_fold or self.down[1]


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
        return [p for g in (*self.attentions, *self.ffns) for p in g.linears()]


@dataclass(frozen=True)
class Norm:
    """A norm over the residual stream: ``path`` holds ``weight`` [d] (and maybe ``bias``), ``eps``
    names its epsilon attribute. RMS norms (mean False) stay exact when channels go: weight x
    sqrt(d / d'), epsilon x d / d'. A norm that subtracts a mean (mean True, an nn.LayerNorm) cannot
    absorb it that way: it becomes a ``WideLayerNorm`` (statistics over the original width)."""

    path: str
    eps: str = "variance_epsilon"
    mean: bool = False


class WideLayerNorm(nn.LayerNorm):
    """A LayerNorm that lost stream channels which were zeros in the masked model: mean and variance
    over the ORIGINAL width ``full_width`` (the removed channels count as zeros), so its kept outputs
    are exactly the masked model's. Exact where every reader of its output drops the removed
    channels, as every reader of the stream does (the masked model masks their inputs)."""

    full_width: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, n = self.full_width, x.shape[-1]
        xf = x if x.dtype == torch.float64 else x.float()
        mu = xf.sum(-1, keepdim=True) / d
        var = ((xf - mu).square().sum(-1, keepdim=True) + (d - n) * mu.square()) / d
        y = ((xf - mu) * torch.rsqrt(var + self.eps)).to(x.dtype)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


@dataclass(frozen=True)
class Residual:
    """The residual stream of width ``width`` (issue 13: one shared mask, removed physically).

    entries: modules whose first input is the stream as it enters the blocks (the mask scales it
             there; everything before is what writes it); writers: Linears whose output rows are
             stream channels outside the blocks (input projections); embeddings: nn.Embedding
             modules writing stream channels (their columns go); readers: Linears reading the
             stream outside the blocks (output heads; their columns go); norms: every norm over the
             stream. Inside the blocks, q/k/v/up inputs and o/down outputs are stream sides.
    refuse:  why removal is not exact for this model (then --residual raises with it)."""

    width: int
    entries: tuple[str, ...]
    writers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()
    norms: tuple[Norm, ...] = ()
    refuse: str | None = None
    computed: tuple[str, ...] = ()  # modules computing a width-d output without weights (sinusoids)
    width_attrs: tuple[tuple[str, str], ...] = ()  # (module path, attribute) holding the width, set to d'


@dataclass(frozen=True)
class Layout:
    """A family's structure. attention_cls: the class a restructured attention takes (a subclass
    of the model's own attention class whose forward accepts per-layer q/k and v/o head dims);
    extra: the keys of ``plan.extra``, in order; residual: the residual stream (None: the family
    declares none, so --residual is refused); gates: whether sub-blocks carry gates (--layers)."""

    blocks: tuple[Block, ...]
    attention_cls: type | None = None
    extra: tuple[str, ...] = ("heads", "ffn")
    residual: Residual | None = None
    gates: bool = False

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
    rk = _residual_keep(layout, masks)  # kept stream channels (None: the stream keeps its width)
    gates = {}
    kept: dict[str, list[int]] = {}
    for blk in layout.blocks:
        for a in blk.attentions:
            dead = _gate_off(masks, a.path, gates)
            kept[a.path] = _plan_attention(model, pb, plan, by_path, masks, a, rk, dead)
        for f in blk.ffns:
            dead = _gate_off(masks, f.path, gates)
            keep = plan_ffn(model, pb, by_path, masks, act=f.act, up=f.up[1], down=f.down[1],
                            gate=f.gate[1] if f.gate else None, residual=rk, dead=dead)
            if dead:
                _drop_bias(plan, f.down[1])
            plan.extra["ffn"][f.path] = len(keep)
        for t in blk.tables:
            _plan_table(model, pb, plan, t, kept)
    if rk is not None:
        _plan_residual(model, pb, plan, layout.residual, rk)
    if gates:
        plan.extra["gates"] = gates
    return plan


def _residual_keep(layout: Layout, masks: dict[str, torch.Tensor]) -> list[int] | None:
    m = masks.get("residual")
    if m is None:
        return None
    r = layout.residual
    if r is None:
        raise ValueError("plan: a 'residual' mask was given, but this family declares no residual stream")
    if r.refuse:
        raise ValueError(f"residual pruning is not available for this model: {r.refuse}")
    m = m.detach().reshape(-1).to("cpu")
    if m.numel() < 1 or r.width % m.numel():
        raise ValueError(f"mask residual has {m.numel()} entries, which do not divide the stream width {r.width}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask residual must hold only 0 and 1 to repack: a fractional value scales the stream "
                         "that the norms see, which no weight can absorb exactly")
    keep = torch.nonzero((m != 0).repeat_interleave(r.width // m.numel())).reshape(-1).tolist()
    if not keep:
        raise ValueError("mask residual removes every channel of the residual stream; keep at least one")
    return None if len(keep) == r.width else keep


def _gate_off(masks: dict[str, torch.Tensor], path: str, gates: dict) -> bool:
    g = masks.get(f"{path}.gate")
    if g is None:
        return False
    if g.numel() != 1:
        raise ValueError(f"mask {path}.gate has {g.numel()} entries, expected 1")
    off = float(g.reshape(-1)[0]) == 0.0
    gates[path] = 0 if off else 1
    return off


def _drop_bias(plan: Plan, path: str) -> None:
    # a gated-off sub-block's last map is a ZeroLinear; its (folded, zero) bias need not be kept
    plan.linears[path]["bias"] = False
    plan.keep.pop(f"{path}.bias", None)


def _plan_attention(model, pb: PlanBuilder, plan: Plan, by_path, masks, a: Attention,
                    rk: list[int] | None = None, dead: bool = False) -> list[int]:
    lq, lk, lv, lo = (linear_live(model, by_path[a.linear(r)], masks) for r in "qkvo")
    if dead:  # gated off: the sub-block adds exactly zero, every head goes
        none = torch.zeros(a.n_heads * a.head_dim, dtype=torch.bool)
        hp = plan_heads(a.n_heads, a.head_dim, none, none, qk_full=a.qk_full)
    else:
        hp = plan_heads(a.n_heads, a.head_dim, lq.out & lk.out, lv.out & lo.inp, qk_full=a.qk_full)
    qk_rows, qk_dim = hp.qk_rows, hp.qk_dim
    if a.rope is not None:
        qk_rows, qk_dim, plan.extra["rope_pairs"][a.path] = _rope_rows(a, lq.out, lk.out, hp.heads)
    pb.linear(model, a.linear("q"), qk_rows, rk, zero=dead or not bool(lq.inp.any()))
    pb.linear(model, a.linear("k"), qk_rows, rk, zero=dead or not bool(lk.inp.any()))
    pb.linear(model, a.linear("v"), hp.v_rows, rk, zero=dead or not bool(lv.inp.any()))
    pb.linear(model, a.linear("o"), rk, hp.v_rows, zero=dead or not bool(lo.inp.any()))
    if dead:
        _drop_bias(plan, a.linear("o"))
    n = len(hp.heads)
    value = {"heads": n, "qk_dim": qk_dim, "v_dim": hp.v_dim, "qk_inner": n * qk_dim, "orig_qk_dim": a.head_dim}
    plan.attrs[a.path] = {name: value[q] for name, q in a.sizes}
    for name in a.head_params:  # [head_dim] shared by the heads -> per kept head, its own q/k dims
        rows = [d for dims in hp.qk_dims for d in dims]
        pb.param(f"{a.path}.{name}", [len(rows)], rows, None)
    plan.extra["heads"][a.path] = hp.heads
    return hp.heads


def _plan_residual(model, pb: PlanBuilder, plan: Plan, r: Residual, keep: list[int]) -> None:
    """The stream's own modules outside the blocks: writer rows, reader and embedding columns, and
    every norm's weight rows scaled by sqrt(d / d') with its epsilon x d / d' (exact for RMS norms:
    rsqrt(sum / d' + eps d / d') = sqrt(d' / d) rsqrt(sum / d + eps))."""
    d, dk = r.width, len(keep)
    for w in r.writers:
        pb.linear(model, w, keep, None)
    for rd in r.readers:
        pb.linear(model, rd, None, keep)
    for e in r.embeddings:
        emb = model.get_submodule(e)
        pb.param(f"{e}.weight", [emb.num_embeddings, dk], None, keep)
    for n in r.norms:
        mod = model.get_submodule(n.path)
        pb.param(f"{n.path}.weight", [dk], keep, None)
        if getattr(mod, "bias", None) is not None:
            pb.param(f"{n.path}.bias", [dk], keep, None)
        if n.mean:  # statistics over the original width (WideLayerNorm): weights and eps unchanged
            plan.attrs[n.path] = {n.eps: float(getattr(mod, n.eps)), "full_width": d}
        else:
            plan.keep[f"{n.path}.weight"]["scale"] = math.sqrt(d / dk)
            plan.attrs[n.path] = {n.eps: float(getattr(mod, n.eps)) * d / dk}
    plan.extra["residual"] = keep


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
    norms = {n.path: n for n in layout.residual.norms} if layout.residual is not None else {}
    if "residual" in plan.extra:
        _apply_residual(model, layout.residual, plan, family)
    for ap, attrs in plan.attrs.items():
        if ap in norms:
            continue  # set by _apply_residual
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


def _apply_residual(model: nn.Module, r: Residual | None, plan: Plan, family: str) -> None:
    """Norm weights / biases and epsilons, and embedding tables, at the planned stream width
    (tied embedding tables stay one Parameter)."""
    if r is None or r.refuse:
        raise ValueError(f"{family} plan: extra.residual is set but this model's residual stream cannot be pruned"
                         + (f" ({r.refuse})" if r is not None and r.refuse else ""))
    keep = plan.extra["residual"]
    if not (isinstance(keep, list) and keep and all(type(j) is int and 0 <= j < r.width for j in keep)
            and keep == sorted(set(keep))):
        raise ValueError(f"{family} plan: extra.residual must list kept stream channels, ascending, in [0, {r.width})")
    dk = len(keep)
    for n in r.norms:
        mod = model.get_submodule(n.path)
        attrs = plan.attrs.get(n.path, {})
        eps = attrs.get(n.eps)
        want = {n.eps, "full_width"} if n.mean else {n.eps}
        if set(attrs) != want or not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0 \
                or (n.mean and attrs["full_width"] != r.width):
            raise ValueError(f"{family} plan: attrs.{n.path} must be {{{n.eps!r}: a non-negative number"
                             + (f", 'full_width': {r.width}" if n.mean else "") + "}")
        setattr(mod, n.eps, float(eps))
        if n.mean:
            adopt_class(mod, WideLayerNorm)
            mod.full_width = r.width
            mod.normalized_shape = (dk,)
        for name in ("weight", "bias"):
            old = getattr(mod, name, None)
            if isinstance(old, nn.Parameter):
                setattr(mod, name, nn.Parameter(old.new_empty(dk), requires_grad=old.requires_grad))
    for path, attr in r.width_attrs:
        setattr(model.get_submodule(path), attr, dk)
    idx = torch.tensor(keep, dtype=torch.long)
    for c in r.computed:  # a computed width-d output keeps the kept channels
        model.get_submodule(c).register_forward_hook(
            lambda mod, args, out, idx=idx: out.index_select(-1, idx.to(out.device)))
    new_of: dict[int, nn.Parameter] = {}
    for e in r.embeddings:
        emb = model.get_submodule(e)
        w = emb.weight
        if id(w) not in new_of:
            new_of[id(w)] = nn.Parameter(w.new_empty(w.shape[0], dk), requires_grad=w.requires_grad)
        emb.weight = new_of[id(w)]
        emb.embedding_dim = dk


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


# -- residual stream and sub-block gates (issue 13) ---------------------------------------------
def layout_units(layout: Layout, model: nn.Module, *, residual: bool, layers: bool, block,
                 family: str) -> tuple[list[Site], list[Point]]:
    """Reader sites (a shared "residual" input mask) and Points (stream entries, sub-block gates)."""
    sites: list[Site] = []
    points: list[Point] = []
    if residual:
        r = layout.residual
        if r is None:
            raise ValueError(f"{family}: the layout declares no residual stream, so --residual is not available")
        if r.refuse:
            raise ValueError(f"{family}: residual pruning is not exact for this model: {r.refuse}")
        spec = residual_spec(r.width, resolve_block(block, "residual", resolve_block(block, "ffn")))
        for path in r.readers:
            sites.append(Site(path, spec, None, "residual", "residual.read", residual_in=True, name_in="residual"))
        for path in r.entries:
            points.append(Point("residual", path, "input", spec.units, spec.block, "residual", "residual"))
    if layers:
        if not layout.gates:
            raise ValueError(f"{family}: the layout declares no sub-block gates, so --layers is not available")
        for blk in layout.blocks:
            for g in (*blk.attentions, *blk.ffns):
                width = _gate_width(model, g)
                points.append(g.gate_point(blk.layer, width))
    return sites, points


def stream_modules(model: nn.Module, width: int, norm_cls: type, skip: str = "output_patch_embedding"
                   ) -> tuple[tuple[str, ...], tuple["Norm", ...]]:
    """(embedding paths, RMS Norms) over a stream of ``width``: every nn.Embedding of that width
    (not a relative-position table) and every ``norm_cls`` with a [width] weight, except under
    ``skip`` (an output head's own norm is over its output, not the stream)."""
    embs = tuple(n for n, m in model.named_modules()
                 if isinstance(m, nn.Embedding) and m.embedding_dim == width and "relative_attention_bias" not in n)
    norms = tuple(Norm(n) for n, m in model.named_modules()
                  if isinstance(m, norm_cls) and tuple(m.weight.shape) == (width,) and not n.startswith(skip))
    return embs, norms


def _gate_width(model: nn.Module, g) -> int:
    fold = model.get_submodule(g.fold())
    if isinstance(fold, nn.Linear):
        return fold.out_features
    return int(fold.weight.shape[-1])


def _numel(mod: nn.Module, seen: set[int]) -> int:
    n = 0
    for p in mod.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def layout_unit_params(layout: Layout, model: nn.Module, sites: list[Site], points: list[Point]) -> dict[str, float]:
    """Parameters one unit removes: "residual" (one stream unit: a row or column of every Linear on
    the stream, an entry of every norm, a column of every embedding table), each gate (every
    parameter of its sub-block's Linears) and "inner" (all block Linears' parameters over the
    number of inner units: the average inner unit). Tied tables count once."""
    out: dict[str, float] = {}
    groups = {g.path: g for b in layout.blocks for g in (*b.attentions, *b.ffns)}
    block_lin = [p for b in layout.blocks for p in b.linears()]
    inner_units = sum(spec.units for s in sites for side, spec in (("in", s.mask_in), ("out", s.mask_out))
                      if spec is not None and s.mask_name(side) != "residual")
    total = _numel_paths(model, block_lin)
    out["inner"] = total / max(1, inner_units)
    for pt in points:
        if pt.name.endswith(".gate"):
            out[pt.name] = float(_numel_paths(model, groups[pt.name[: -len(".gate")]].linears()))
    if any(pt.name == "residual" for pt in points):
        r = layout.residual
        blk = r.width // next(pt.units for pt in points if pt.name == "residual")
        per = 0
        for b in layout.blocks:
            for a in b.attentions:
                for role in "qkv":
                    per += model.get_submodule(a.linear(role)).out_features
                o = model.get_submodule(a.linear("o"))
                per += o.in_features + (o.bias is not None)
            for f in b.ffns:
                for pth in f.ups().values():
                    per += model.get_submodule(pth).out_features
                dn = model.get_submodule(f.down[1])
                per += dn.in_features + (dn.bias is not None)
        for w in r.writers:
            lin = model.get_submodule(w)
            per += lin.in_features + (lin.bias is not None)
        for rd in r.readers:
            per += model.get_submodule(rd).out_features
        seen: set[int] = set()
        for e in r.embeddings:
            w = model.get_submodule(e).weight
            if id(w) not in seen:
                seen.add(id(w))
                per += w.shape[0]
        for n in r.norms:
            mod = model.get_submodule(n.path)
            per += 1 + (getattr(mod, "bias", None) is not None)
        out["residual"] = float(per * blk)
    return out


def _numel_paths(model: nn.Module, paths) -> int:
    seen: set[int] = set()
    return sum(_numel(model.get_submodule(p), seen) for p in paths)


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

    def extra_units(self, model: nn.Module, *, residual: bool, layers: bool) -> tuple[list[Site], list[Point]]:
        return layout_units(self._checked_layout(model), model, residual=residual, layers=layers,
                            block=self.block, family=self.family)

    def unit_params(self, model: nn.Module, sites: list[Site], points: list[Point]) -> dict[str, float]:
        return layout_unit_params(self._checked_layout(model), model, sites, points)


__all__ = [
    "Attention", "Block", "FFN", "Layout", "LayoutAdapter", "Norm", "Residual", "RoPE", "SharedHeadTable", "WideLayerNorm",
    "adopt_class",
    "check_layout", "layout_apply", "layout_plan", "layout_sites", "layout_units", "layout_unit_params", "stream_modules",
]
