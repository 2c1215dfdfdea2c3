"""Masks -> repack plan -> a physically smaller model of the same class.

Stage of the flow: masks (from the Pruner or a user) + the adapter's coupled Plan
(:class:`tsprune.adapters.base.Plan`) -> masks folded into the weights -> ONE
``tsprune_kernels.repack`` call over every tensor whose shape changes -> ``adapter.apply_plan``
(new module shapes) -> :func:`load_exact`. The saved form of the result is :mod:`tsprune.checkpoint`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import tsprune_kernels as K

from .adapters.base import Adapter, Plan, Site
from .masking import detach_masks

__all__ = ["fold_masks_", "fold_points_", "gather_planned", "repack_model", "load_exact"]


@torch.no_grad()
def fold_masks_(model: nn.Module, sites: list[Site], masks: dict[str, torch.Tensor]) -> None:
    """W <- expand(m_out)[:, None] * W * expand(m_in)[None, :], b <- b * expand(m_out), in place.

    After this the unmasked model computes what the masked one did, for any mask values."""
    for s in sites:
        lin = model.get_submodule(s.path)
        w = lin.weight
        if s.mask_out is not None and s.mask_name("out") in masks:
            m = masks[s.mask_name("out")].to(w.dtype).repeat_interleave(s.mask_out.block)
            w.mul_(m[:, None])
            if lin.bias is not None:
                lin.bias.mul_(m)
        if s.mask_in is not None and s.mask_name("in") in masks:
            m = masks[s.mask_name("in")].to(w.dtype).repeat_interleave(s.mask_in.block)
            w.mul_(m[None, :])


@torch.no_grad()
def fold_points_(model: nn.Module, points, masks: dict[str, torch.Tensor]) -> None:
    """A gate's value g into its ``fold`` module (weight and bias x g): the sub-block's contribution
    is linear in that module's output, so the unmasked model computes what the gated one did.
    Stream entries need nothing: their mask must be 0/1 (the plan checks)."""
    for pt in points:
        if pt.fold is None or pt.name not in masks:
            continue
        g = masks[pt.name].reshape(-1)
        mod = model.get_submodule(pt.fold)
        for name in ("weight", "bias"):
            t = getattr(mod, name, None)
            if isinstance(t, torch.Tensor):
                t.mul_(g.to(t.dtype)[0])


def gather_planned(sd: dict[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """Every tensor the plan changes, gathered in ONE tsprune_kernels.repack call (and multiplied by
    the entry's "scale", e.g. a norm weight after residual channels went): key -> new tensor."""
    keys = list(plan.keep)
    missing = [k for k in keys if k not in sd]
    if missing:
        raise KeyError(f"plan keeps tensors the model does not have: {missing[:5]}")
    dev = next(iter(sd.values())).device
    gathered = K.repack(
        [sd[k] for k in keys],
        [_index(plan.keep[k].get("rows"), dev) for k in keys],
        [_index(plan.keep[k].get("cols"), dev) for k in keys],
    )
    out = {}
    for k, t in zip(keys, gathered):
        sc = plan.keep[k].get("scale")
        out[k] = t * sc if sc is not None else t
    return out


def _index(v, device) -> torch.Tensor | None:
    if v is None:
        return None
    return torch.as_tensor(v, dtype=torch.long, device=device)


@torch.no_grad()
def repack_model(
    model: nn.Module, adapter: Adapter, sites: list[Site], masks: dict[str, torch.Tensor], points=()
) -> tuple[nn.Module, Plan]:
    """A new, physically smaller model computing what ``model`` masked by ``masks`` computes.

    points: the Pruner's hook masks (residual stream entries, sub-block gates; adapters.base.Point).
    ``model`` is left as it was (masks attached or not). Returns (new_model, plan)."""
    plan = adapter.plan(model, masks, sites=sites)
    new = copy.deepcopy(model)
    detach_masks(new)
    fold_masks_(new, sites, masks)
    fold_points_(new, points, masks)
    sd = new.state_dict()
    gathered = gather_planned(sd, plan)
    adapter.apply_plan(new, plan)
    load_exact(new, {**sd, **gathered})
    new.tsprune_plan = plan  # save_pruned(new, dir) then writes this plan
    return new, plan


def load_exact(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Assign ``tensors`` to every state-dict entry of ``model``; each must be present with the
    model's shape (after apply_plan). Raises naming the first mismatches."""
    target = model.state_dict()
    missing = [k for k in target if k not in tensors]
    bad = [
        f"{k}: model {tuple(target[k].shape)} vs given {tuple(tensors[k].shape)}"
        for k in target
        if k in tensors and tuple(target[k].shape) != tuple(tensors[k].shape)
    ]
    if missing or bad:
        raise ValueError(
            "pruned model and its tensors disagree: "
            + (f"missing {missing[:5]} " if missing else "")
            + (f"shape mismatch {bad[:5]}" if bad else "")
        )
    tied = _tied_slots(model)
    model.load_state_dict({k: tensors[k] for k in target}, strict=True, assign=True)
    for slots in tied:  # assign=True gives every slot its own Parameter: tie them again
        p = getattr(*slots[0])
        for mod, name in slots[1:]:
            setattr(mod, name, p)


def _tied_slots(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Parameter slots (module, name) that share one Parameter (e.g. T5's shared / embed_tokens)."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((mod, name))
    return [s for s in slots.values() if len(s) > 1]
