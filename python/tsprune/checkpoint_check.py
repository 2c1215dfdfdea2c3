"""Field-by-field checks of a saved directory's meta.json and plan.json (used by ``load_pruned``).

Stage of the flow: load. Receives the parsed JSON and the *unpruned* model built from config.json
(the registry's class, never a name from the files); raises ``ValueError`` with one line naming the
file and the field for anything that is not what ``save_pruned`` writes: wrong types, negative or
out-of-range sizes, module paths the model does not have, attributes that are not plain integer
sizes, head indices out of range or repeated, and per-layer shapes that disagree with each other
(heads x head dim vs the projections, FFN up vs down widths, bias heads vs the bias table).
Nothing here touches a weight.
"""
from __future__ import annotations

import math

from typing import Any

from torch import nn

_PLAN_KEYS = ("family", "linears", "attrs", "params", "keep", "extra")
_LINEAR_KEYS = ("in", "out", "bias", "zero")
_MAX = 2**31 - 1

# attribute names of attention modules in the supported families
_HEADS = ("n_heads", "num_heads")
_QK_DIM = ("key_value_proj_dim", "kv_proj_dim", "head_dim")
_PROJ = {"q": ("q", "q_proj"), "k": ("k", "k_proj"), "v": ("v", "v_proj"), "o": ("o", "o_proj", "out_proj")}


class Where:
    """Formats one-line errors: ``load_pruned: DIR/plan.json field 'linears.x.out': ...``."""

    def __init__(self, path):
        self.path = path

    def fail(self, field: str, msg: str):
        raise ValueError(f"load_pruned: {self.path} field {field!r}: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(w: Where, field: str, v, lo: int = 0, hi: int = _MAX) -> int:
    if not _is_int(v):
        w.fail(field, f"expected an integer, got {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        w.fail(field, f"{v} is out of range [{lo}, {hi}]")
    return v


def _dict(w: Where, field: str, v) -> dict:
    if not isinstance(v, dict):
        w.fail(field, f"expected a JSON object, got {type(v).__name__}")
    return v


def _index_list(w: Where, field: str, v, n: int, *, length: int | None = None, ascending: bool = False,
                unique: bool = True) -> list[int]:
    if not isinstance(v, list):
        w.fail(field, f"expected a list of indices, got {type(v).__name__}")
    for i, e in enumerate(v):
        _int(w, f"{field}[{i}]", e, 0, max(n - 1, 0))
        if n == 0:
            w.fail(f"{field}[{i}]", f"index {e} into an empty range")
    if unique and len(set(v)) != len(v):
        w.fail(field, "repeated indices")
    if ascending and v != sorted(v):
        w.fail(field, "indices must be ascending")
    if length is not None and len(v) != length:
        w.fail(field, f"has {len(v)} entries, expected {length}")
    return v


def _submodule(w: Where, field: str, model: nn.Module, path) -> nn.Module:
    if not isinstance(path, str) or not path:
        w.fail(field, f"module path must be a non-empty string, got {path!r}")
    try:
        return model.get_submodule(path)
    except AttributeError:
        w.fail(field, f"the model has no module {path!r}")


# -- meta.json ----------------------------------------------------------------------------------
META_FIELDS = ("format", "format_version", "tsprune_version", "model_class", "config_class", "family",
               "aliases", "n_params", "storage_dtype", "sha256", "extra")


def check_meta_types(w: Where, meta: Any) -> dict:
    """Types of meta.json's fields (versions and model class are checked by the caller). From
    format 2 on every field save_pruned writes must be there, and no other."""
    if not isinstance(meta, dict):
        raise ValueError(f"load_pruned: {w.path} must be a JSON object, got {type(meta).__name__}")
    fv = meta.get("format_version")
    if _is_int(fv) and fv >= 2:
        for f in META_FIELDS:
            if f not in meta:
                w.fail(f, "missing")
        for f in meta:
            if f not in META_FIELDS:
                w.fail(f, f"unknown field (expected {', '.join(META_FIELDS)})")
    for f in ("format", "tsprune_version", "model_class", "family"):
        if f in meta and not isinstance(meta[f], str):
            w.fail(f, f"expected a string, got {type(meta[f]).__name__}")
    aliases = _dict(w, "aliases", meta.get("aliases", {}))
    for k, v in aliases.items():
        if not isinstance(v, str):
            w.fail(f"aliases.{k}", f"expected a tensor name, got {type(v).__name__}")
    if "extra" in meta:
        _dict(w, "extra", meta["extra"])
    if "n_params" in meta:
        _int(w, "n_params", meta["n_params"], 0, 2**62)
    return meta


# -- plan.json ----------------------------------------------------------------------------------
def check_plan(w: Where, d: Any, model: nn.Module, family: str) -> None:
    """plan.json against the unpruned model (built from config.json) and the adapter's family."""
    if not isinstance(d, dict):
        raise ValueError(f"load_pruned: {w.path} must be a JSON object, got {type(d).__name__}")
    unknown = [k for k in d if k not in _PLAN_KEYS]
    if unknown:
        w.fail(unknown[0], f"unknown field (expected {', '.join(_PLAN_KEYS)})")
    if d.get("family") != family:
        w.fail("family", f"{d.get('family')!r} does not match the model class's family {family!r}")
    sections = {k: _dict(w, k, d.get(k, {})) for k in _PLAN_KEYS[1:]}
    shapes = _check_linears(w, sections["linears"], model)
    _check_attrs(w, sections["attrs"], model)
    _check_params(w, sections["params"], model)
    _check_consistency(w, sections, model, shapes)
    _check_keep(w, sections["keep"], model, sections["linears"], sections["params"])


def _check_linears(w, linears: dict, model: nn.Module) -> dict[str, tuple[int, int]]:
    shapes = {}
    for path, spec in linears.items():
        f = f"linears.{path}"
        lin = _submodule(w, f, model, path)
        if not isinstance(lin, nn.Linear):
            w.fail(f, f"{path!r} is a {type(lin).__name__}, not a Linear")
        spec = _dict(w, f, spec)
        for k in spec:
            if k not in _LINEAR_KEYS:
                w.fail(f"{f}.{k}", f"unknown field (expected {', '.join(_LINEAR_KEYS)})")
        for k in ("in", "out", "bias"):
            if k not in spec:
                w.fail(f"{f}.{k}", "missing")
        n_in = _int(w, f"{f}.in", spec["in"], 0, lin.in_features)
        n_out = _int(w, f"{f}.out", spec["out"], 0, lin.out_features)
        for k in ("bias", "zero"):
            if k in spec and not isinstance(spec[k], bool):
                w.fail(f"{f}.{k}", f"expected true/false, got {spec[k]!r}")
        if spec["bias"] and lin.bias is None:
            w.fail(f"{f}.bias", "true, but the model's Linear has no bias")
        if spec["bias"] and n_out == 0:
            w.fail(f"{f}.bias", "true for a Linear with no output")
        if (n_in == 0 or n_out == 0) and not spec.get("zero", False):
            w.fail(f"{f}.zero", f"must be true for a Linear of shape in={n_in}, out={n_out}")
        shapes[path] = (n_in, n_out)
    return shapes


def _check_attrs(w, attrs: dict, model: nn.Module) -> None:
    for path, spec in attrs.items():
        f = f"attrs.{path}"
        mod = _submodule(w, f, model, path)
        spec = _dict(w, f, spec)
        for name, v in spec.items():
            fa = f"{f}.{name}"
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                w.fail(fa, "not a plain attribute name")
            cur = getattr(mod, name, None) if hasattr(mod, name) else None
            if isinstance(cur, float):  # a norm's epsilon (rescaled when residual channels go)
                if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                    w.fail(fa, f"expected a finite non-negative number, got {v!r}")
                continue
            if hasattr(mod, name) and not _is_int(cur):
                w.fail(fa, f"{type(mod).__name__}.{name} is not an integer size ({type(cur).__name__})")
            _int(w, fa, v, 0, cur if _is_int(cur) else _MAX)


def _check_params(w, params: dict, model: nn.Module) -> None:
    sd = dict(model.named_parameters(remove_duplicate=False))  # tied tables under every name
    total = sum(p.numel() for p in dict(model.named_parameters()).values())
    for key, shape in params.items():
        f = f"params.{key}"
        if key not in sd:
            w.fail(f, f"the model has no parameter {key!r}")
        orig = tuple(sd[key].shape)
        if not isinstance(shape, list) or len(shape) != len(orig):
            w.fail(f, f"expected a list of {len(orig)} sizes, got {shape!r}")
        # a per-layer parameter may grow past its original shape (TimesFM's shared [head_dim]
        # query scaling becomes per head); bounded by the model's size, checked against the weights
        for i, s in enumerate(shape):
            _int(w, f"{f}[{i}]", s, 0, total)
        n = 1
        for s in shape:
            n *= s
        if n > total:
            w.fail(f, f"shape {shape} has more elements than the whole model ({total})")


def _check_keep(w, keep: dict, model: nn.Module, linears: dict, params: dict) -> None:
    """keep is provenance (load does not use it): types, ranges, and lengths that agree with the
    planned shapes of its Linear (linears) or parameter (params)."""
    sd = model.state_dict()
    for key, spec in keep.items():
        f = f"keep.{key}"
        if key not in sd:
            w.fail(f, f"the model has no tensor {key!r}")
        spec = _dict(w, f, spec)
        for k in spec:
            if k not in ("rows", "cols", "scale"):
                w.fail(f"{f}.{k}", "unknown field (expected rows, cols, scale)")
        sc = spec.get("scale", 1.0)
        if not (isinstance(sc, (int, float)) and not isinstance(sc, bool) and math.isfinite(sc) and sc > 0):
            w.fail(f"{f}.scale", f"expected a finite positive number, got {sc!r}")
        t = sd[key]
        path, _, leaf = key.rpartition(".")
        if key in params:
            sizes = params[key]
        elif path in linears and leaf in ("weight", "bias"):
            sizes = [linears[path]["out"], linears[path]["in"]][: t.dim()]
        else:
            w.fail(f, "names a tensor that neither linears nor params plans")
        for side, dim in (("rows", 0), ("cols", 1)):
            v = spec.get(side)
            if v is not None:
                if dim >= t.dim():
                    w.fail(f"{f}.{side}", f"tensor {key!r} is {t.dim()}-D")
                # a gather may repeat an index (TimesFM's per-head query scaling)
                _index_list(w, f"{f}.{side}", v, t.shape[dim], length=sizes[dim], unique=False)


def _get(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _attr(spec: dict, mod: nn.Module, names: tuple[str, ...]):
    for n in names:
        if n in spec:
            return n, spec[n]
    for n in names:
        if _is_int(getattr(mod, n, None)):
            return n, getattr(mod, n)
    return None, None


def _check_consistency(w, s: dict, model: nn.Module, shapes: dict) -> None:
    """Per-layer shapes agree with each other (what a forward pass would otherwise find late)."""
    attrs, extra, params = s["attrs"], s["extra"], s["params"]

    def shape_of(path: str) -> tuple[int, int]:
        if path in shapes:
            return shapes[path]
        lin = model.get_submodule(path)
        return lin.in_features, lin.out_features

    heads_x = _dict(w, "extra.heads", extra.get("heads", {}))
    bias_heads = _dict(w, "extra.bias_heads", extra.get("bias_heads", {}))
    tables = _dict(w, "extra.bias_tables", extra.get("bias_tables", {}))
    ffn = _dict(w, "extra.ffn", extra.get("ffn", {}))
    rope = _dict(w, "extra.rope_pairs", extra.get("rope_pairs", {}))
    n_orig_heads: dict[str, int] = {}
    for ap, spec in attrs.items():
        mod = model.get_submodule(ap)
        proj = {}
        for role, names in _PROJ.items():
            for n in names:
                if isinstance(getattr(mod, n, None), nn.Linear):
                    proj[role] = f"{ap}.{n}"
                    break
        hn, h = _attr(spec, mod, _HEADS)
        qn, dqk = _attr(spec, mod, _QK_DIM)
        if len(proj) != 4 or h is None or qn is None:
            continue  # not an attention module of a known layout: its shapes are checked by the weights
        orig_h = getattr(mod, hn, None)
        if not _is_int(orig_h):  # e.g. TimesFM 2.5 keeps no head count: q's width / head dim
            orig_dqk = getattr(mod, qn, None)
            orig_q = model.get_submodule(proj["q"]).out_features
            orig_h = orig_q // orig_dqk if _is_int(orig_dqk) and orig_dqk > 0 else orig_q
        n_orig_heads[ap] = orig_h
        dv = spec.get("v_head_dim", dqk)
        f = f"attrs.{ap}"
        q_out, k_out = shape_of(proj["q"])[1], shape_of(proj["k"])[1]
        v_out, o_in = shape_of(proj["v"])[1], shape_of(proj["o"])[0]
        if q_out != k_out or q_out not in (h * dqk, 0):
            w.fail(f"{f}.{hn}", f"{h} heads x {qn} {dqk} = {h * dqk} but q/k have {q_out}/{k_out} outputs")
        if not (v_out == o_in == h * dv):
            w.fail(f"{f}.{hn}", f"{h} heads x v_head_dim {dv} = {h * dv} but v has {v_out} outputs, o {o_in} inputs")
        for name in ("inner_dim", "q_size", "kv_size"):  # given, or the module's own (unchanged)
            v = spec.get(name, getattr(mod, name, None))
            if _is_int(v) and v != h * dqk:
                w.fail(f"{f}.{name}", f"{v} != {h} heads x {dqk}" + ("" if name in spec else " (missing)"))
        if ap not in heads_x:
            w.fail(f"extra.heads.{ap}", "missing: every attention module in attrs lists its kept heads")
        _index_list(w, f"extra.heads.{ap}", heads_x[ap], orig_h, length=h, ascending=True)
        tm = f"{ap.split('.block.')[0]}.block.0.layer.0.SelfAttention"
        if ap.endswith("SelfAttention") and ".block." in ap and \
                getattr(_get(model, tm), "has_relative_attention_bias", False) and ap not in bias_heads:
            w.fail(f"extra.bias_heads.{ap}", "missing: a T5 self-attention takes its position-bias heads from it")
        if "orig_head_dim" in spec and spec["orig_head_dim"] != getattr(mod, "head_dim", None):
            w.fail(f"{f}.orig_head_dim", f"{spec['orig_head_dim']} is not the model's head_dim "
                                         f"{getattr(mod, 'head_dim', None)}")
        if f"{ap}.scaling" in params and params[f"{ap}.scaling"] != [h * dqk]:
            w.fail(f"params.{ap}.scaling", f"{params[f'{ap}.scaling']} != [{h} heads x {dqk}]")
        if ap in rope:  # Chronos-2: per head, the kept rotary pairs (ascending, each once)
            orig_d = getattr(mod, qn)
            f_r = f"extra.rope_pairs.{ap}"
            if not isinstance(rope[ap], list) or len(rope[ap]) != h:
                w.fail(f_r, f"expected a list of {h} heads")
            for i, js in enumerate(rope[ap]):
                _index_list(w, f"{f_r}[{i}]", js, orig_d // 2, length=dqk // 2, ascending=True)
    for ap in heads_x:
        if ap not in attrs:
            w.fail(f"extra.heads.{ap}", "names no module listed in attrs")
    for key in params:
        if key.endswith(".relative_attention_bias.weight"):
            tm = key[: -len(".relative_attention_bias.weight")]
            if tm not in tables:
                w.fail(f"extra.bias_tables.{tm}", f"missing: params resizes {key!r}")
    for tm, cols in tables.items():
        key = f"{tm}.relative_attention_bias.weight"
        if key not in params:
            w.fail(f"extra.bias_tables.{tm}", f"no params entry {key!r}")
        att = _submodule(w, f"extra.bias_tables.{tm}", model, tm)
        _index_list(w, f"extra.bias_tables.{tm}", cols, getattr(att, "n_heads", 0), length=params[key][1],
                    ascending=True)
    for ap, idx in bias_heads.items():
        f = f"extra.bias_heads.{ap}"
        if ap not in attrs:
            w.fail(f, "names no module listed in attrs")
        h = _attr(attrs[ap], model.get_submodule(ap), _HEADS)[1]
        tm = f"{ap.split('.block.')[0]}.block.0.layer.0.SelfAttention"
        if tm not in tables:
            w.fail(f, f"no bias table {tm!r} in extra.bias_tables")
        _index_list(w, f, idx, len(tables[tm]), length=h)
        heads = heads_x.get(ap)
        if heads is not None:
            want = [tables[tm].index(x) if x in tables[tm] else -1 for x in heads]
            if idx != want:
                w.fail(f, f"{idx} does not select this layer's heads {heads} from the table's {tables[tm]}"
                          f" (expected {want})")
    for fp, n in ffn.items():
        f = f"extra.ffn.{fp}"
        mod = _submodule(w, f, model, fp)
        lins = [f"{fp}.{name}" for name, m in mod.named_modules() if isinstance(m, nn.Linear)]
        if len(lins) < 2:
            continue
        _int(w, f, n, 0, model.get_submodule(lins[0]).out_features)
        *ups, down = lins
        for up in ups:
            if shape_of(up)[1] != n:
                w.fail(f, f"{n} channels but {up} has {shape_of(up)[1]} outputs (linears.{up}.out)")
        if shape_of(down)[0] != n:
            w.fail(f, f"{n} channels but {down} has {shape_of(down)[0]} inputs (linears.{down}.in)")
