"""Training-side loops: calibration with masks (stage 1), fine-tuning (stage 2), evaluation.

Stage of the flow: receives a model + its adapter + a ForecastTask (data.py); calibration drives
the Pruner (masks live in its arena), fine-tuning trains every remaining weight, evaluation
reports MSE / MAE on scaled values. Nothing here knows a model family or a kernel.
"""
from __future__ import annotations

import copy
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import distributed as D
from .adapters.base import Adapter
from .data import MetricAccumulator, WindowDataset
from .pruner import Pruner


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def batch_indices(n: int, batch_size: int, shuffle: bool, seed: int = 0):
    """The window indices of every micro-batch over ``n`` windows (the global order: data-parallel
    ranks each take their shard of every one of these, see tsprune.distributed.shard)."""
    idx = np.arange(n)
    if shuffle:
        np.random.default_rng(seed).shuffle(idx)
    for i in range(0, len(idx), batch_size):
        yield idx[i : i + batch_size]


def batches(ds: WindowDataset, batch_size: int, shuffle: bool, seed: int = 0):
    """(context [B, L], target [B, H]) float32 tensors over ``ds``."""
    for idx in batch_indices(len(ds), batch_size, shuffle, seed):
        yield ds.batch(idx)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def n_batches(ds: WindowDataset, batch_size: int) -> int:
    return math.ceil(len(ds) / batch_size)


@contextmanager
def frozen(model: nn.Module):
    """All parameters frozen inside (stage 1: only masks get gradients); restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


@torch.no_grad()
def mean_loss(model: nn.Module, adapter: Adapter, ds: WindowDataset, batch_size: int,
              distributed: bool = False) -> float:
    """Mean loss over ``ds``. ``distributed`` (under torch.distributed): each rank takes a
    contiguous share of the windows and (loss sum, count) are summed over ranks; every rank
    returns the same value."""
    model.eval()
    tot, n = 0.0, 0
    if distributed and D.is_dist():
        dev = _device(model)
        a, b = D.shard_bounds(len(ds))
        passes = -(-(b - a) // batch_size)
        if D.is_sharded(model):  # FSDP: as many forwards as the largest shard on every rank
            passes = -(-(-(-len(ds) // D.world_size())) // batch_size)
        for i in range(a, a + passes * batch_size, batch_size):
            if i < b:
                ctx, tgt = ds.batch(np.arange(i, min(i + batch_size, b)))
                tot += float(adapter.loss(model, ctx.to(dev), tgt.to(dev))) * len(ctx)
                n += len(ctx)
            else:  # nothing left here: a pass that counts for nothing keeps FSDP's collectives paired
                ctx, tgt = ds.batch(np.arange(1))
                adapter.loss(model, ctx.to(dev), tgt.to(dev))
        tot, n = D.sum_across_ranks(tot, n, what="reduce of the validation loss")
        return tot / max(n, 1)
    for ctx, tgt in batches(ds, batch_size, shuffle=False):
        tot += float(adapter.loss(model, ctx, tgt)) * len(ctx)
        n += len(ctx)
    return tot / max(n, 1)


@torch.no_grad()
def evaluate(model: nn.Module, adapter: Adapter, ds: WindowDataset, batch_size: int = 64,
             progress: bool = False) -> dict:
    """MSE / MAE of the point forecast over ``ds`` (scaled values), accumulated in float64."""
    model.eval()
    acc = MetricAccumulator()
    for ctx, tgt in _progress(batches(ds, batch_size, False), n_batches(ds, batch_size), "evaluate", progress):
        acc.update(adapter.predict(model, ctx, tgt.shape[-1]), tgt)
    return acc.result()


@dataclass
class CalibrationResult:
    best_epoch: int
    best_val_loss: float
    windows: int = 0
    history: list[dict] = field(default_factory=list)


def calibrate(
    model: nn.Module,
    pruner: Pruner,
    train: WindowDataset,
    val: WindowDataset,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    patience: int = 1,
    val_tolerance: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> CalibrationResult:
    """SPEC stage 1: frozen weights, masks on every site, gradient accumulation into the arena,
    pruning at macro-batch boundaries, validation each epoch with patience, restore of the best
    masks (masks only: no weight is ever changed, so an earlier, less-pruned best comes back whole).

    The kept masks are those of the latest epoch whose validation loss is within ``val_tolerance``
    (relative) of the lowest seen; 0 is SPEC's rule (keep the best). A small tolerance trades a
    little masked validation loss, before fine-tuning, for a smaller model.

    Data-parallel (the pruner was built under an initialised torch.distributed group): every rank
    walks the same global micro-batches and takes its contiguous shard of each (tsprune.distributed),
    its loss scaled by shard / micro-batch so the summed mask gradients equal one process's; the
    pruner all-reduces once per macro-step; validation losses are summed over ranks. Progress and
    ``log`` on rank 0 only."""
    if val_tolerance < 0:
        raise ValueError(f"calibrate: val_tolerance must be >= 0, got {val_tolerance}")
    adapter = pruner.adapter
    if pruner.samples_per_epoch is None:
        pruner.samples_per_epoch = len(train)
    ddp = pruner.comm is not None
    sharded = False
    if ddp:
        fp = D.model_fingerprint(model)
        D.check_consistent({
            "arena units": pruner.arena.n_units, "live units": pruner.arena.n_live(),
            "train windows": len(train), "val windows": len(val), "batch_size": batch_size,
            "macro_batch_size": pruner.macro_batch_size, "samples_per_epoch": pruner.samples_per_epoch,
            "epochs": epochs, "seed": seed, "model checksum": float("nan") if fp is None else fp,
        }, "calibration setup", pruner.comm.timeout_s)
        progress = progress and D.is_main()
        log = log if D.is_main() else None
        sharded = D.is_sharded(model)
        if sharded and pruner.criterion in ("magnitude", "wanda"):
            raise ValueError(f"calibrate: criterion {pruner.criterion!r} reads whole weights outside the "
                             "forward and is not supported on a sharded (FSDP) model yet; use taylor, "
                             "taylor2 or fisher")
    dev = _device(model)
    seed_everything(seed)
    with frozen(model):
        pruner.attach()
        best = (mean_loss(model, adapter, val, batch_size, distributed=ddp), pruner.state_dict())
        lowest = best[0]
        hist = [{"epoch": 0, "val_loss": best[0], "pruned": pruner.pruned_fraction()}]
        best_epoch, bad, seen = 0, 0, 0
        for ep in range(1, epochs + 1):
            model.train()
            it = batch_indices(len(train), batch_size, shuffle=True, seed=seed + ep)
            for idx in _progress(it, n_batches(train, batch_size), f"calibrate {ep}", progress):
                mine = D.shard(idx) if ddp else idx  # this rank's share of the global micro-batch
                if len(mine):
                    ctx, tgt = train.batch(mine)
                    loss = adapter.loss(model, ctx.to(dev), tgt.to(dev))
                    if len(mine) != len(idx):  # the loss is a batch mean: make it a share of the global one
                        loss = loss * (len(mine) / len(idx))
                    loss.backward()
                elif sharded:  # empty shard under FSDP: a zero-weight pass keeps the collectives paired
                    ctx, tgt = train.batch(idx[:1])
                    (adapter.loss(model, ctx.to(dev), tgt.to(dev)) * 0.0).backward()
                pruner.step(len(idx))
                seen += len(idx)
                if pruner.done:
                    break
            v = mean_loss(model, adapter, val, batch_size, distributed=ddp)
            hist.append({"epoch": ep, "val_loss": v, "pruned": pruner.pruned_fraction(),
                         "macro_steps": pruner.macro_steps})
            if log:
                log(f"calibrate epoch {ep}: val loss {v:.4f}, pruned {pruner.pruned_fraction():.1%}")
            lowest = min(lowest, v)
            if v <= lowest * (1 + val_tolerance):
                best, best_epoch, bad = (v, pruner.state_dict()), ep, 0
            else:
                bad += 1
            if bad >= patience or pruner.done:
                break
        pruner.load_state_dict(best[1])
    return CalibrationResult(best_epoch=best_epoch, best_val_loss=best[0], windows=seen, history=hist)


def finetune(
    model: nn.Module,
    adapter: Adapter,
    train: WindowDataset,
    val: WindowDataset,
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    patience: int = 1,
    max_steps: int | None = None,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """SPEC stage 2: every weight trainable, AdamW, early stopping on the validation loss (the
    best weights are restored). Returns the history."""
    seed_everything(seed)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best_loss = mean_loss(model, adapter, val, batch_size)
    best_state = copy.deepcopy(model.state_dict())
    hist, bad, step = [{"epoch": 0, "val_loss": best_loss}], 0, 0
    for ep in range(1, epochs + 1):
        model.train()
        it = batches(train, batch_size, shuffle=True, seed=seed + 1000 + ep)
        for ctx, tgt in _progress(it, n_batches(train, batch_size), f"finetune {ep}", progress):
            opt.zero_grad(set_to_none=True)
            loss = adapter.loss(model, ctx, tgt)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            step += 1
            if max_steps and step >= max_steps:
                break
        v = mean_loss(model, adapter, val, batch_size)
        hist.append({"epoch": ep, "val_loss": v, "steps": step})
        if log:
            log(f"finetune epoch {ep}: val loss {v:.4f}")
        if v < best_loss:
            best_loss, best_state, bad = v, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
        if bad >= patience or (max_steps and step >= max_steps):
            break
    model.load_state_dict(best_state)
    model.eval()
    return {"best_val_loss": best_loss, "history": hist}
