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

__all__ = ["fold_masks_", "repack_model", "load_exact"]


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


def _index(v, device) -> torch.Tensor | None:
    if v is None:
        return None
    return torch.as_tensor(v, dtype=torch.long, device=device)


@torch.no_grad()
def repack_model(
    model: nn.Module, adapter: Adapter, sites: list[Site], masks: dict[str, torch.Tensor]
) -> tuple[nn.Module, Plan]:
    """A new, physically smaller model computing what ``model`` masked by ``masks`` computes.

    ``model`` is left as it was (masks attached or not). Returns (new_model, plan)."""
    plan = adapter.plan(model, masks, sites=sites)
    new = copy.deepcopy(model)
    detach_masks(new)
    fold_masks_(new, sites, masks)
    sd = new.state_dict()
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
    adapter.apply_plan(new, plan)
    load_exact(new, {**sd, **dict(zip(keys, gathered))})
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
