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


class _ScaleChannels(torch.autograd.Function):
    """y = x * expand(m) over the last dim (m [units], each entry covering ``block`` channels);
    backward adds d loss / d m = per-unit sums of gy * x (fp32; fp64 for fp64 x) into ``acc``.
    Saved for backward: x and m. A gate is 1 unit whose block is the whole width."""

    @staticmethod
    def forward(ctx, x, m, block, acc):
        ctx.save_for_backward(x, m)
        ctx.block, ctx.acc = block, acc
        return x * m.to(x.dtype).repeat_interleave(block)

    @staticmethod
    def backward(ctx, gy):
        x, m = ctx.saved_tensors
        acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
        dx = gy * m.to(gy.dtype).repeat_interleave(ctx.block)
        dm = (gy.to(acc_t) * x.to(acc_t)).reshape(-1, m.numel(), ctx.block).sum((0, 2))
        if ctx.acc is not None:
            ctx.acc.add_(dm.to(ctx.acc.dtype))
        # with an accumulator the sum goes there only (as masked_linear does); else to m's .grad
        return dx, (dm.to(m.dtype) if ctx.needs_input_grad[1] and ctx.acc is None else None), None, None


def scale_channels(x: torch.Tensor, m: torch.Tensor, block: int, acc: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., units * block] * expand(m); the mask gradient is added into ``acc`` [units] if given."""
    if x.shape[-1] != m.numel() * block:
        raise ValueError(f"scale_channels: x has {x.shape[-1]} channels, mask covers {m.numel()} x {block}")
    return _ScaleChannels.apply(x, m, block, acc)


_HOOKS = "_tsprune_hooks"


def attach_point(module: nn.Module, where: str, mask: torch.Tensor, block: int, acc: torch.Tensor | None) -> None:
    """Hook a Point's mask on ``module``: ``where`` "input" scales its first input (positional or
    ``hidden_states``), "output" its output (the first element of a tuple). ``detach`` removes it."""
    if where == "input":
        def pre(mod, args, kwargs):
            if args:
                return (scale_channels(args[0], mask, block, acc), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": scale_channels(kwargs["hidden_states"], mask, block, acc)}

        h = module.register_forward_pre_hook(pre, with_kwargs=True)
    elif where == "output":
        def post(mod, args, out):
            if isinstance(out, tuple):
                return (scale_channels(out[0], mask, block, acc), *out[1:])
            if isinstance(out, dict):  # a ModelOutput: its first field
                key = next(iter(out))
                out[key] = scale_channels(out[key], mask, block, acc)
                return out
            return scale_channels(out, mask, block, acc)

        h = module.register_forward_hook(post)
    else:
        raise ValueError(f"attach_point: where must be 'input' or 'output', got {where!r}")
    module.__dict__.setdefault(_HOOKS, []).append(h.id)


def attach(module: nn.Linear, binding: MaskBinding) -> None:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"masks go on nn.Linear modules, got {type(module).__name__}")
    setattr(module, _ATTR, binding)
    module.forward = types.MethodType(_masked_forward, module)


def detach(module: nn.Module) -> None:
    if hasattr(module, _ATTR):
        delattr(module, _ATTR)
        del module.forward  # falls back to the class's forward
    for hid in module.__dict__.pop(_HOOKS, ()):  # by id: also right on a deepcopy of a hooked model
        module._forward_pre_hooks.pop(hid, None)
        module._forward_pre_hooks_with_kwargs.pop(hid, None)
        module._forward_hooks.pop(hid, None)


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


def attach_points(model: nn.Module, points, masks: dict[str, torch.Tensor]) -> None:
    """Plain hook-based masks without accumulators (for users and tests): masks[point.name]."""
    for pt in points:
        attach_point(model.get_submodule(pt.path), pt.where, masks[pt.name], pt.block, None)


def is_masked(model: nn.Module) -> bool:
    return any(hasattr(m, _ATTR) or m.__dict__.get(_HOOKS) for m in model.modules())
