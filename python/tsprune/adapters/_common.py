"""Shared machinery of the layout engine (layout.py) and the family files: mask sides, coupled keep
indices of attention heads and FFN channels, module replacement, and the objective helpers
(trained part of a target, the autoregressive roll-out, channel packing).

Stage of the flow: adapter internals. Receives mask values (one entry per unit, any float) and the
modules they sit on; hands the adapters Python lists of kept indices (JSON-serialisable) and new,
uninitialised modules of the planned shapes. Touches no model state beyond what an adapter asks.

Liveness rules (all exact for any mask values, because repack folds the masks into the weights
first; docs/METHOD.md, "Units"):

* a channel is *alive* on one side of a Linear when its mask entry is nonzero;
* an output of a Linear is *effectively* alive when its out-mask is nonzero and it can be nonzero:
  some input is alive, or its bias is nonzero;
* an input of a Linear is effectively alive when its in-mask is nonzero and some output is alive;
* a q/k head dim survives iff q and k are both effectively alive there (else q.k gets 0 from it);
  a v/o head dim survives iff v.out and o.in are both effectively alive there; a head with no
  surviving v/o dim is removed with its q/k rows (its output is exactly zero);
* an FFN channel survives iff the down projection's input is alive and the up (and gate)
  projections can make it nonzero (an activation with act(0) != 0 keeps a channel whose up row is
  gone: it still adds act(0) * W_down[:, c]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import MaskSpec, Site, ZeroLinear


# -- masks ----------------------------------------------------------------------------------------
def resolve_block(block: int | dict[str, int], kind: str, default: int = 1) -> int:
    """Block size of ``kind`` ("ffn.wi", "residual", ...) from Adapter(block=...): an int applies to
    every FFN kind; a dict is looked up by the full kind, then its prefix ("ffn"), then "default"."""
    if isinstance(block, int):
        return int(block)
    for key in (kind, kind.split(".")[0], "default"):
        if key in block:
            return int(block[key])
    return default


def ffn_spec(width: int, block: int, what: str) -> MaskSpec:
    if block < 1 or width % block:
        raise ValueError(f"{what}: FFN width {width} is not a multiple of block {block}")
    return MaskSpec(width // block, block)


def residual_spec(width: int, block: int) -> MaskSpec:
    """Residual-stream mask: the FFN block where it divides the width, else single channels."""
    if block < 1 or width % block:
        block = 1
    return MaskSpec(width // block, block)


def head_spec(n_heads: int, head_dim: int, heads: bool) -> MaskSpec:
    return MaskSpec(n_heads, head_dim) if heads else MaskSpec(n_heads * head_dim, 1)


def side_alive(masks: dict[str, torch.Tensor], site: Site, side: str, width: int) -> torch.Tensor:
    """Bool [width] on CPU: mask entry != 0, expanded over its block; all True without a mask."""
    spec = site.mask_in if side == "in" else site.mask_out
    m = masks.get(site.mask_name(side)) if spec is not None else None
    if m is None:
        return torch.ones(width, dtype=torch.bool)
    m = m.detach().reshape(-1).to("cpu")
    if m.numel() != spec.units:
        raise ValueError(f"mask {site.mask_name(side)} has {m.numel()} entries, expected {spec.units}")
    alive = (m != 0).repeat_interleave(spec.block)
    if alive.numel() != width:
        raise ValueError(f"mask {site.mask_name(side)} covers {alive.numel()} channels, module has {width}")
    return alive


@dataclass
class LinearLive:
    """Effective liveness of one Linear's channels under its own masks (see module docstring)."""

    inp: torch.Tensor  # bool [in_features]
    out: torch.Tensor  # bool [out_features]
    has_bias: bool


def linear_live(model: nn.Module, site: Site, masks: dict[str, torch.Tensor]) -> LinearLive:
    lin = model.get_submodule(site.path)
    m_in = side_alive(masks, site, "in", lin.in_features)
    m_out = side_alive(masks, site, "out", lin.out_features)
    bias = getattr(lin, "bias", None)
    can = torch.full_like(m_out, bool(m_in.any()))
    if bias is not None:
        can |= bias.detach().to("cpu") != 0
    out = m_out & can
    inp = m_in & bool(out.any())
    return LinearLive(inp, out, bias is not None)


def act_at_zero(act: nn.Module | object) -> float:
    """act(0) of an activation module / function (0 for relu, gelu, silu ...)."""
    with torch.no_grad():
        return float(act(torch.zeros(1)))


# -- attention heads -----------------------------------------------------------------------------
@dataclass
class HeadPlan:
    heads: list[int]  # kept original head ids, ascending
    qk_dim: int  # uniform q/k head dim of the kept heads
    v_dim: int  # uniform v/o head dim of the kept heads
    qk_rows: list[int]  # kept q/k output rows (into n_heads * head_dim), head-major
    v_rows: list[int]  # kept v output rows == kept o input columns
    qk_dims: list[list[int]]  # per kept head: the original within-head dims of its q/k slots


def _pad(alive_dims: list[int], dead_dims: list[int], width: int) -> list[int]:
    # dead dims carry zero weights after folding (a zero q or k row, a zero v row or o column),
    # so any of them pads a head to the uniform width exactly.
    return sorted(alive_dims + dead_dims[: width - len(alive_dims)])


def plan_heads(
    n_heads: int,
    head_dim: int,
    qk_alive: torch.Tensor,
    vo_alive: torch.Tensor,
    *,
    qk_full: bool = False,
) -> HeadPlan:
    """Coupled head / head-dim selection of one attention module.

    qk_alive / vo_alive: bool [n_heads * head_dim]. qk_full: kept heads keep all q/k dims (for
    models that normalise q/k over the head dim, where a dim's removal would change the norm)."""
    qk = qk_alive.reshape(n_heads, head_dim)
    vo = vo_alive.reshape(n_heads, head_dim)
    heads = [h for h in range(n_heads) if bool(vo[h].any())]
    qk_n = [int(qk[h].sum()) for h in heads]
    v_n = [int(vo[h].sum()) for h in heads]
    qk_dim = head_dim if qk_full else max(qk_n, default=0)
    v_dim = max(v_n, default=0)
    qk_rows: list[int] = []
    v_rows: list[int] = []
    qk_dims: list[list[int]] = []
    for h in heads:
        a = [d for d in range(head_dim) if qk[h, d]]
        dead = [d for d in range(head_dim) if not qk[h, d]]
        dims = _pad(a, dead, qk_dim)
        qk_dims.append(dims)
        qk_rows += [h * head_dim + d for d in dims]
        a = [d for d in range(head_dim) if vo[h, d]]
        dead = [d for d in range(head_dim) if not vo[h, d]]
        v_rows += [h * head_dim + d for d in _pad(a, dead, v_dim)]
    return HeadPlan(heads, qk_dim, v_dim, qk_rows, v_rows, qk_dims)


def plan_channels(*alive: torch.Tensor) -> list[int]:
    """Indices where every given bool vector is True."""
    acc = alive[0].clone()
    for a in alive[1:]:
        acc &= a
    return torch.nonzero(acc).reshape(-1).tolist()


# -- plan entries ----------------------------------------------------------------------------------
class PlanBuilder:
    """Accumulates Plan.linears / keep for Linears whose rows / columns are gathered."""

    def __init__(self, plan):
        self.plan = plan

    def linear(
        self,
        model: nn.Module,
        path: str,
        rows: list[int] | None,
        cols: list[int] | None,
        *,
        zero: bool = False,
    ) -> None:
        """rows / cols: kept output / input indices (None = all). zero: the Linear computes a
        constant (no live input) and becomes a ZeroLinear holding its bias."""
        lin = model.get_submodule(path)
        n_out = lin.out_features if rows is None else len(rows)
        n_in = lin.in_features if cols is None else len(cols)
        bias = getattr(lin, "bias", None) is not None and n_out > 0
        zero = bool(zero or n_out == 0 or n_in == 0)
        self.plan.linears[path] = {"in": n_in, "out": n_out, "bias": bias, "zero": zero}
        full_rows = rows is None or rows == list(range(lin.out_features))
        full_cols = cols is None or cols == list(range(lin.in_features))
        r = None if full_rows else list(rows)
        c = None if full_cols else list(cols)
        if not zero and (r is not None or c is not None):
            self.plan.keep[f"{path}.weight"] = {"rows": r, "cols": c}
        if bias and r is not None and n_out > 0:
            self.plan.keep[f"{path}.bias"] = {"rows": r, "cols": None}

    def param(self, key: str, shape: list[int], rows: list[int] | None, cols: list[int] | None) -> None:
        self.plan.params[key] = [int(s) for s in shape]
        if rows is not None or cols is not None:
            self.plan.keep[key] = {"rows": rows, "cols": cols}


# -- horizons ----------------------------------------------------------------------------------
def trained_part(target: torch.Tensor, prediction_length: int) -> torch.Tensor:
    """The steps a model trains on: target [B, H] -> [B, min(H, prediction_length)].

    Every adapter trains at min(horizon, the model's prediction length) and rolls out beyond it at
    forecast time (docs/METHOD.md "Horizons"), so a longer target keeps its first steps only."""
    if target.ndim < 1 or target.shape[-1] < 1:
        raise ValueError(f"target must have at least one step, got shape {tuple(target.shape)}")
    return target[..., :prediction_length] if target.shape[-1] > prediction_length else target


def roll_out(step, context: torch.Tensor, horizon: int) -> torch.Tensor:
    """Autoregressive point forecast [B, horizon] from context [B, L].

    step(ctx [B, L']) -> [B, p] is one forward pass of the model; beyond p the forecast is appended
    to the context and forecast again (the decode loop of TimesFM, used for every family without a
    pipeline of its own; docs/METHOD.md "Horizons")."""
    outs, ctx, left = [], context, horizon
    while left > 0:
        y = step(ctx)
        outs.append(y[:, :left])
        left -= y.shape[-1]
        ctx = torch.cat([ctx, y.to(ctx.dtype)], dim=-1)
    return torch.cat(outs, dim=-1)


def median_index(quantiles) -> int:
    """Index of the quantile level closest to 0.5 (the point forecast of quantile models)."""
    qs = [float(q) for q in quantiles]
    return min(range(len(qs)), key=lambda i: abs(qs[i] - 0.5))


def pack_series(x: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, T] single series -> [ceil(B / C), T, C] for a channel-independent model of C input
    channels (the last series repeats as padding); C == 1 gives [B, T, 1]."""
    if channels == 1:
        return x.unsqueeze(-1)
    pad = (-x.shape[0]) % channels
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])], dim=0)
    return x.reshape(-1, channels, x.shape[-1]).transpose(1, 2)


def unpack_series(y: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of ``pack_series``: [B', T, C] -> [b, T]."""
    return y.transpose(1, 2).reshape(-1, y.shape[1])[:b]


# -- module surgery ------------------------------------------------------------------------------
def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _like(mod: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
        return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def zero_linear(in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> ZeroLinear:
    z = ZeroLinear(in_features, out_features, bias=bias)
    return z.to(device=device, dtype=dtype)


def replace_linear(model: nn.Module, path: str, spec: dict) -> nn.Module:
    """Swap the Linear at ``path`` for an uninitialised one (or a ZeroLinear) of ``spec``'s shape."""
    old = model.get_submodule(path)
    device, dtype = _like(old)
    if spec.get("zero"):
        new = zero_linear(spec["in"], spec["out"], spec["bias"], device, dtype)
    else:
        new = torch.nn.utils.skip_init(
            nn.Linear, spec["in"], spec["out"], bias=spec["bias"], device=device, dtype=dtype
        )
    new.train(old.training)
    set_submodule(model, path, new)
    return new


def apply_linears(model: nn.Module, plan) -> None:
    for path, spec in plan.linears.items():
        replace_linear(model, path, spec)


# -- per-module sites and plans shared by the families --------------------------------------------
def attention_sites(
    model: nn.Module,
    proj: dict[str, str],
    n_heads: int,
    head_dim: int,
    *,
    heads: bool,
    residual_block: int,
    layer: str,
    kind: str,
) -> list[Site]:
    """Sites of one attention module. proj: {"q": path, "k": path, "v": path, "o": path}."""
    hs = head_spec(n_heads, head_dim, heads)
    out = []
    for name in ("q", "k", "v"):
        lin = model.get_submodule(proj[name])
        rs = residual_spec(lin.in_features, residual_block)
        out.append(Site(proj[name], rs, hs, layer, f"{kind}.{name}", residual_in=True))
    o = model.get_submodule(proj["o"])
    rs = residual_spec(o.out_features, residual_block)
    out.append(Site(proj["o"], hs, rs, layer, f"{kind}.o", residual_out=True))
    return out


def ffn_sites(
    model: nn.Module,
    ups: dict[str, str],
    down: tuple[str, str],
    *,
    block: int | dict[str, int],
    residual_block: int,
    layer: str,
) -> list[Site]:
    """Sites of one FFN. ups: {kind: path} of the up / gate projections; down: (kind, path)."""
    out = []
    for kind, path in ups.items():
        lin = model.get_submodule(path)
        spec = ffn_spec(lin.out_features, resolve_block(block, kind), path)
        out.append(Site(path, residual_spec(lin.in_features, residual_block), spec, layer, kind, residual_in=True))
    kind, path = down
    lin = model.get_submodule(path)
    spec = ffn_spec(lin.in_features, resolve_block(block, kind), path)
    out.append(Site(path, spec, residual_spec(lin.out_features, residual_block), layer, kind, residual_out=True))
    return out


def plan_ffn(
    model: nn.Module,
    pb: PlanBuilder,
    sites: dict[str, Site],
    masks: dict[str, torch.Tensor],
    *,
    act,
    up: str,
    down: str,
    gate: str | None = None,
    residual: list[int] | None = None,
    dead: bool = False,
) -> list[int]:
    """Coupled FFN channels into the plan. Without ``gate``: down(act(up x)); with it:
    down(act(gate x) * up x). residual: kept stream channels (up / gate columns, down rows; None =
    all); dead: the sub-block is gated off (no channel is kept). Returns the kept channels."""
    a0 = act_at_zero(act) != 0
    ld = linear_live(model, sites[down], masks)
    lu = linear_live(model, sites[up], masks)
    if gate is None:
        alive = ld.inp & (lu.out | a0)
        ups = {up: lu}
    else:
        lg = linear_live(model, sites[gate], masks)
        alive = ld.inp & lu.out & (lg.out | a0)
        ups = {gate: lg, up: lu}
    if dead:
        alive = torch.zeros_like(alive)
    keep = plan_channels(alive)
    for path, live in ups.items():
        pb.linear(model, path, keep, residual, zero=dead or not bool(live.inp.any()))
    pb.linear(model, down, residual, keep, zero=dead or not bool(ld.inp.any()))
    return keep


def refuse_repacked(model: nn.Module) -> None:
    """Sites and plans are computed on an unpruned model; a repacked one (per-layer shapes, separate
    q/k and v/o head dims, ZeroLinears) cannot be pruned again by these adapters. A repacked model
    is recognised by the plan repack / load_pruned attach to it when that plan removed something
    (``model.tsprune_plan.keep``, whatever the family, including layouts defined outside the
    package; a saved unpruned model carries an empty one) or by modules of tsprune's own
    classes (the pruned attentions of the family files, ZeroLinear)."""
    if getattr(getattr(model, "tsprune_plan", None), "keep", None) or any(
            type(m).__module__.startswith(__package__ + ".") for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} was already repacked by tsprune; prune the original model instead "
            "(re-pruning a repacked model is not supported)"
        )
