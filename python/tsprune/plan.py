"""Masks -> repack plan -> physically smaller model; and the saved form of a pruned model.

Stage of the flow: masks (from the Pruner or a user) + the adapter's coupled plan -> one
``tsprune_kernels.repack`` call over every tensor whose shape changes -> a new model of the same
class. ``save_pruned`` / ``load_pruned`` store the result as safetensors + a JSON plan, so loading
needs neither the calibration run nor the masks.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import tsprune_kernels as K

from .adapters.base import Adapter, Plan, Site
from .masking import detach_masks


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
    plan = adapter.plan(model, masks)
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


# -- save / load ------------------------------------------------------------------------------------

FORMAT_VERSION = 1
_FILES = ("meta.json", "config.json", "plan.json", "model.safetensors")


def _qualname(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _import(qualname: str):
    import importlib

    mod, _, name = qualname.partition(":")
    obj = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def save_pruned(model: nn.Module, directory, plan: Plan | None = None, extra: dict | None = None) -> None:
    """Write ``model`` (pruned or not) to ``directory`` atomically: safetensors weights, the model's
    config, the JSON plan with every per-layer shape, and meta (class names, tied tensors).

    The directory is assembled under a temporary name beside it and renamed into place; an existing
    directory is only replaced once the new one is complete."""
    import json
    import os
    import pathlib
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from . import __version__

    plan = plan or getattr(model, "tsprune_plan", None)
    if plan is None:
        from .adapters import get_adapter

        plan = Plan(family=get_adapter(model).family)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"save_pruned: {type(model).__name__} has no HF-style .config to save")
    out = pathlib.Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    tensors, aliases, seen = {}, {}, {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]  # tied weight: stored once
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    meta = {
        "format": "tsprune-pruned",
        "format_version": FORMAT_VERSION,
        "tsprune_version": __version__,
        "model_class": _qualname(type(model)),
        "config_class": _qualname(type(config)),
        "family": plan.family,
        "aliases": aliases,
        "n_params": sum(p.numel() for p in model.parameters()),
        "extra": extra or {},
    }
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a saved model is an ordinary directory
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))
        (tmp / "plan.json").write_text(json.dumps(plan.to_json(), indent=1))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks completeness
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_pruned(directory, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by ``save_pruned``: needs no calibration state, no masks, no network.

    Raises FileNotFoundError / ValueError naming the missing or corrupt file."""
    import json
    import pathlib

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .adapters import get_adapter

    d = pathlib.Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"load_pruned: {d} is not a directory")
    for f in _FILES:
        if not (d / f).is_file():
            raise FileNotFoundError(f"load_pruned: {d / f} is missing (incomplete or not a tsprune save)")
    try:
        meta = json.loads((d / "meta.json").read_text())
        config_d = json.loads((d / "config.json").read_text())
        plan = Plan.from_json(json.loads((d / "plan.json").read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"load_pruned: corrupt JSON in {d}: {e}") from None
    if meta.get("format") != "tsprune-pruned":
        raise ValueError(f"load_pruned: {d / 'meta.json'} is not a tsprune save")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"load_pruned: format version {meta['format_version']} is newer than this tsprune")
    try:
        tensors = load_file(str(d / "model.safetensors"), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"load_pruned: corrupt weights file {d / 'model.safetensors'}: {e}") from None
    for k, src in meta.get("aliases", {}).items():
        tensors[k] = tensors[src]
    config_cls = _import(meta["config_class"])
    model_cls = _import(meta["model_class"])
    config = config_cls.from_dict(config_d) if hasattr(config_cls, "from_dict") else config_cls(**config_d)
    model = model_cls(config)
    get_adapter(model).apply_plan(model, plan)
    load_exact(model, tensors)
    model.tsprune_plan = plan
    model.eval()
    return model
