"""Put masks on a model's Linears (stage 1 of docs/METHOD.md) without changing its classes or state dict.

Stage of the flow: adapter sites + mask tensors -> a model whose Linears compute
``((x * m_in) @ W.T + b) * m_out`` through ``tsprune_kernels.masked_linear``.

The forward of each Linear instance is overridden (its class, parameters and module path are
untouched), so repack and save see the same model. ``detach_masks`` restores the original forward.
Masks, gradient accumulators, squared-gradient accumulators and activation-square sums are plain
tensors handed in by the caller (normally views into a ScoreArena's flat buffer, bound by the
Pruner for the statistics its criterion reads); this module owns none of them.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

import tsprune_kernels as K

from .adapters.base import Site

_ATTR = "_tsprune_masked"


@dataclass
class MaskBinding:
    """What one Linear's masked forward reads (masks) and writes (accumulators) in backward."""

    mask_in: torch.Tensor | None = None
    mask_out: torch.Tensor | None = None
    block_in: int = 1
    block_out: int = 1
    grad_in: torch.Tensor | None = None
    grad_out: torch.Tensor | None = None
    sq_in: torch.Tensor | None = None
    sq_out: torch.Tensor | None = None
    act_sq: torch.Tensor | None = None  # [in_features] fp32 sum of x**2 per input channel (criteria reading "act"), or None


def _masked_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    b: MaskBinding = getattr(self, _ATTR)
    if b.act_sq is not None:
        K.act_sq_accumulate_(x.detach(), b.act_sq)
    return K.masked_linear(
        x,
        self.weight,
        self.bias,
        mask_in=b.mask_in,
        mask_out=b.mask_out,
        block_in=b.block_in,
        block_out=b.block_out,
        grad_acc_in=b.grad_in,
        grad_acc_out=b.grad_out,
        sq_acc_in=b.sq_in,
        sq_acc_out=b.sq_out,
    )


def attach(module: nn.Linear, binding: MaskBinding) -> None:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"masks go on nn.Linear modules, got {type(module).__name__}")
    setattr(module, _ATTR, binding)
    module.forward = types.MethodType(_masked_forward, module)


def detach(module: nn.Module) -> None:
    if hasattr(module, _ATTR):
        delattr(module, _ATTR)
        del module.forward  # falls back to the class's forward


def attach_masks(model: nn.Module, sites: list[Site], masks: dict[str, torch.Tensor]) -> None:
    """Plain attach without accumulators (for users and tests): masks[site.mask_name(side)]."""
    for s in sites:
        attach(
            model.get_submodule(s.path),
            MaskBinding(
                mask_in=masks.get(s.mask_name("in")) if s.mask_in else None,
                mask_out=masks.get(s.mask_name("out")) if s.mask_out else None,
                block_in=s.mask_in.block if s.mask_in else 1,
                block_out=s.mask_out.block if s.mask_out else 1,
            ),
        )


def detach_masks(model: nn.Module) -> None:
    for m in model.modules():
        detach(m)


def is_masked(model: nn.Module) -> bool:
    return any(hasattr(m, _ATTR) for m in model.modules())
