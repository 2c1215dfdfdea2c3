"""What a model family must tell tsprune: where the masks go, what is coupled, how to shrink.

Stage of the flow: model -> **adapter** -> mask sites (the Pruner puts them in the ScoreArena).
An adapter receives a model of its family; it hands on

Every built-in family derives all three from one description of its structure (a ``Layout``,
adapters/layout.py); a family file writes the layout, the objective and, where needed, a pruned
attention class.

* ``sites(model)``: every prunable Linear (or Conv1d) with the masks it carries, in a fixed order;
* ``plan(model, masks, sites=None)``: from mask values (one entry per unit) to the physical shapes and keep indices
  of every module, with the couplings of docs/METHOD.md applied (q/k share head dims, v/o share, FFN
  up/gate/down share channels, a head whose v dims are all gone is removed, ...);
* ``apply_plan(model, plan)``: restructures a model *in place* to the plan's shapes (new empty
  Linear modules, per-head parameters, every attribute that sizes a reshape). Both repack (which then
  copies gathered values in) and load (which then loads a state dict) go through it, so a saved model
  loads exactly as it was repacked;
* ``loss`` / ``predict``: the model's own training loss and its point forecast.

Adapters never import tsprune_kernels beyond its public API and never touch the arena.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class MaskSpec:
    """One mask on one side of one Linear: ``units`` entries, each covering ``block`` channels."""

    units: int
    block: int = 1


@dataclass(frozen=True)
class Site:
    """A prunable Linear and its masks.

    path:   dotted module path inside the model (``model.get_submodule(path)`` is an nn.Linear).
    mask_in / mask_out: the masks on its input / output channels, or None for no mask on that side.
    layer:  the layer it belongs to (for the sparsity heatmap), e.g. ``"encoder.3"``.
    kind:   the module type within the layer (heatmap column), e.g. ``"self_attn.q"``, ``"ffn.wi"``.
    residual_in / residual_out: True where that side is the residual (hidden) stream; those zeros
            stay as zero weights after repack (docs/METHOD.md: residual width is not removed yet).
    """

    path: str
    mask_in: MaskSpec | None
    mask_out: MaskSpec | None
    layer: str
    kind: str
    residual_in: bool = False
    residual_out: bool = False
    name_in: str | None = None  # a shared mask's name on that side (e.g. "residual"); None: own mask
    name_out: str | None = None

    def mask_name(self, side: str) -> str:
        own = self.name_in if side == "in" else self.name_out
        return own or f"{self.path}.{side}"


@dataclass(frozen=True)
class Point:
    """A mask applied by a hook on a module rather than on a Linear's sides.

    name:  mask name (several points may share one, e.g. every entry of the residual stream);
    path:  the module; where: "input" scales its first input channel-wise (the residual stream as
           it enters the blocks), "output" scales its output (the first element of a tuple);
    units x block: the mask (a sub-block gate is 1 unit covering the whole width);
    fold:  for gates, the module whose weight / bias absorb the gate's value on repack (the last
           map linear in the gate: o / down, or a post-norm); layer / kind: heatmap row / column."""

    name: str
    path: str
    where: str
    units: int
    block: int
    layer: str
    kind: str
    fold: str | None = None


@dataclass
class Plan:
    """Physical result of pruning: JSON-serialisable shapes plus (optionally) keep indices.

    linears:    path -> {"in": K', "out": N', "bias": bool}; a Linear whose every output is gone is
                listed with out == 0 and replaced by the adapter (its bias, or zeros).
    attrs:      module path -> {attribute: value} the adapter sets (n_heads, inner_dim, ...).
    params:     path of a non-Linear parameter (e.g. a per-layer relative-position bias) -> shape.
    keep:       state-dict key of every tensor whose shape changes -> {"rows": [...] | None,
                "cols": [...] | None}: kept indices into the ORIGINAL tensor (None = all; 1-D tensors
                rows only). Repack gathers all of them in one tsprune_kernels.repack call; saved for
                provenance, not needed by load.
    extra:      adapter-specific JSON (e.g. which heads each layer kept).
    """

    family: str
    linears: dict[str, dict[str, Any]] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, list[int]] = field(default_factory=dict)
    keep: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, with_keep: bool = True) -> dict[str, Any]:
        return {
            "family": self.family,
            "linears": self.linears,
            "attrs": self.attrs,
            "params": self.params,
            "keep": self.keep if with_keep else {},
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        return cls(
            family=d["family"],
            linears=d.get("linears", {}),
            attrs=d.get("attrs", {}),
            params=d.get("params", {}),
            keep=d.get("keep", {}),
            extra=d.get("extra", {}),
        )


class Adapter:
    """Base class; one subclass per model family (one file each in tsprune/adapters/)."""

    family: str = ""
    #: "module:QualName" of every model class this adapter handles: the fixed registry from which
    #: ``load_pruned`` / ``load_model`` take a model class (imported lazily, only these strings).
    #: Built-in families that leave it empty get theirs from adapters._BUILTIN_MODEL_CLASSES.
    model_classes: tuple[str, ...] = ()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def __init__(self, model: nn.Module, *, block: int | dict[str, int] = 1, heads: bool = False):
        """block: units of FFN channels (int, or per-kind dict); heads: True -> attention units are whole
        heads (block = head_dim) instead of single head dims."""
        self.block = block
        self.heads = heads

    # -- stage 1: where the masks go ------------------------------------------------------------
    def sites(self, model: nn.Module) -> list[Site]:
        raise NotImplementedError

    # -- physical repack ------------------------------------------------------------------------
    def plan(self, model: nn.Module, masks: dict[str, torch.Tensor], sites: list[Site] | None = None) -> Plan:
        """masks: Site.mask_name(side) -> 1-D mask (units). Computes coupled keep indices.
        sites: the sites the masks belong to (the Pruner's, which may drop residual sides); None =
        ``self.sites(model)``."""
        raise NotImplementedError

    def apply_plan(self, model: nn.Module, plan: Plan) -> None:
        """Restructure ``model`` in place to ``plan``'s shapes (values undefined afterwards)."""
        raise NotImplementedError

    def extra_units(self, model: nn.Module, *, residual: bool, layers: bool) -> tuple[list[Site], list[Point]]:
        """The units of issue 13 a family declares: with ``residual``, Linears that read the
        residual stream outside the blocks (output heads; sites with a shared "residual" input mask)
        and the points where the stream enters the blocks; with ``layers``, one gate Point per
        removable sub-block. Raises ValueError naming why the family cannot have them."""
        raise ValueError(f"{self.family or type(self).__name__}: this family declares no residual stream "
                         "or sub-blocks (--residual / --layers are not available for it)")

    def unit_params(self, model: nn.Module, sites: list[Site], points: list[Point]) -> dict[str, float]:
        """Parameters one unit of each mask removes, for the masks whose units are not comparable
        with inner channels (the shared residual mask, gates); key "inner": the average over the
        inner units. Only called when such masks exist."""
        raise NotImplementedError

    # -- the model's own objective -------------------------------------------------------------
    def loss(self, model: nn.Module, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """context [B, L] float32 (scaled series), target [B, H]; the model's training loss (scalar)."""
        raise NotImplementedError

    def predict(self, model: nn.Module, context: torch.Tensor, horizon: int) -> torch.Tensor:
        """Point forecast [B, horizon] (median / mean) for context [B, L]."""
        raise NotImplementedError


class ZeroLinear(nn.Module):
    """Stands in for a Linear whose every output unit was pruned: returns its (masked) bias, or
    zeros, broadcast over the input's leading dims. Keeps ``in_features`` / ``out_features`` so code
    that reads them still works; holds no weight (``weight`` is a registered empty slot, None, so
    code that inspects ``module.weight`` such as HF T5's dtype check still runs)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_parameter("weight", None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if self.bias is None:
            return x.new_zeros(shape)
        return self.bias.to(x.dtype).expand(shape)
