"""Training-side loops: calibration with masks (stage 1), fine-tuning (stage 2), evaluation.

Stage of the flow: receives a model + its adapter + a ForecastTask (tsprune.data); calibration drives
the Pruner (masks live in its arena), fine-tuning trains every remaining weight, evaluation
reports MSE / MAE on scaled values. Nothing here knows a model family or a kernel.
"""
from __future__ import annotations

import copy
import math
import random
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import distributed as D
from .adapters.base import Adapter
from .data import MetricAccumulator, WindowDataset, batch_indices
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


def batches(ds: WindowDataset, batch_size: int, shuffle: bool, seed: int = 0):
    """(context [B, L], target [B, H]) float32 tensors over ``ds`` (kept for callers of the old
    name; the loops here take ``batch_indices`` directly)."""
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
    # by name: a compacting Pruner replaces the parameters inside (and restores them on detach)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))


#: What each family's own training loss is (for log lines and results; the adapter's ``loss``).
LOSS_NAMES = {
    "chronos-bolt": "quantile loss",
    "chronos": "token cross-entropy",
    "t5": "quantile loss",
    "timesfm": "MSE + quantile loss",
    "timesfm2.5": "MSE + quantile loss",
    "patchtst": "MSE (NLL for a distribution head)",
}

AMP_MODES = (None, "bf16")


def loss_name(adapter: Adapter) -> str:
    """Readable name of ``adapter.loss`` (e.g. "quantile loss" for Chronos-Bolt)."""
    return getattr(adapter, "loss_name", None) or LOSS_NAMES.get(getattr(adapter, "family", ""), "model loss")


def autocast(amp: str | None, device: torch.device | str = "cpu"):
    """``torch.autocast`` for ``amp="bf16"`` (CPU or CUDA), a no-op context for None."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of None, 'bf16', got {amp!r}")
    dev = torch.device(device).type
    return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=amp == "bf16")


@torch.no_grad()
def mean_loss(model: nn.Module, adapter: Adapter, ds: WindowDataset, batch_size: int,
              distributed: bool = False, amp: str | None = None) -> float:
    """Mean of the model's own loss (:func:`loss_name`) over ``ds``, weighted by window count.
    ``distributed`` (under torch.distributed): each rank takes a contiguous share of the windows
    and (loss sum, count) are summed over ranks; every rank returns the same value."""
    model.eval()
    tot, n = 0.0, 0
    dev = _device(model)
    if distributed and D.is_dist():
        a, b = D.shard_bounds(len(ds))
        passes = -(-(b - a) // batch_size)
        if D.is_sharded(model):  # FSDP: as many forwards as the largest shard on every rank
            passes = -(-(-(-len(ds) // D.world_size())) // batch_size)
        for i in range(a, a + passes * batch_size, batch_size):
            if i < b:
                ctx, tgt = ds.batch(np.arange(i, min(i + batch_size, b)))
                with autocast(amp, dev):
                    tot += float(adapter.loss(model, ctx.to(dev), tgt.to(dev))) * len(ctx)
                n += len(ctx)
            else:  # nothing left here: a pass that counts for nothing keeps FSDP's collectives paired
                ctx, tgt = ds.batch(np.arange(1))
                adapter.loss(model, ctx.to(dev), tgt.to(dev))
        tot, n = D.sum_across_ranks(tot, n, what="reduce of the validation loss")
        return tot / max(n, 1)
    for ctx, tgt in ds.iter_batches(batch_size):
        with autocast(amp, dev):
            tot += float(adapter.loss(model, ctx.to(dev), tgt.to(dev))) * len(ctx)
        n += len(ctx)
    return tot / max(n, 1)


@torch.no_grad()
def evaluate(model: nn.Module, adapter: Adapter, ds: WindowDataset, batch_size: int = 64,
             progress: bool = False, amp: str | None = None, warmup: bool = True) -> dict:
    """MSE / MAE of the point forecast over every window of ``ds`` (scaled values, float64 sums).

    Batched, under no_grad, optionally under bf16 autocast (``amp``; the forecast is cast back to
    float32 before scoring). With ``warmup`` one batch is predicted first and not timed, so
    ``seconds`` / ``ms_per_window`` measure steady-state inference. Returns ``mse``, ``mae``,
    ``windows`` (forecast windows), ``values`` (= windows x horizon; also as ``n``), ``seconds``,
    ``ms_per_window``."""
    model.eval()
    dev = _device(model)
    acc = MetricAccumulator()
    if warmup and len(ds):
        ctx, tgt = ds.batch(np.arange(min(batch_size, len(ds))))
        with autocast(amp, dev):
            adapter.predict(model, ctx.to(dev), tgt.shape[-1])
    t0 = time.perf_counter()
    for ctx, tgt in _progress(ds.iter_batches(batch_size), n_batches(ds, batch_size), "evaluate", progress):
        with autocast(amp, dev):
            pred = adapter.predict(model, ctx.to(dev), tgt.shape[-1])
        acc.update(pred.float(), tgt.to(pred.device))
    secs = time.perf_counter() - t0
    r = acc.result()
    return {"mse": r["mse"], "mae": r["mae"], "n": r["n"], "values": r["n"], "windows": len(ds),
            "seconds": round(secs, 3), "ms_per_window": round(1e3 * secs / max(len(ds), 1), 4)}


@dataclass
class CalibrationResult:
    best_epoch: int
    best_val_loss: float
    windows: int = 0
    history: list[dict] = field(default_factory=list)
    reason: str = ""
    macro_batch_size: int = 0
    notes: list[str] = field(default_factory=list)


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
    eval_batch_size: int | None = None,
) -> CalibrationResult:
    """Stage 1 (docs/METHOD.md): frozen weights (model in eval mode: no dropout), masks on every site,
    gradient accumulation into the arena,
    pruning at macro-batch boundaries, validation each epoch with patience, restore of the best
    masks (masks only: no weight is ever changed, so an earlier, less-pruned best comes back whole).

    The kept masks are those of the latest epoch whose validation loss is within ``val_tolerance``
    (relative) of the lowest seen; 0 is the paper's rule (keep the best). A small tolerance trades a
    little masked validation loss, before fine-tuning, for a smaller model. ``result.reason`` says
    in words which epoch was kept and why (and is logged).

    Epochs and macro-batches: the sample counter restarts every epoch; an epoch's tail (fewer
    windows than a macro-batch) gets its own macro step at the epoch's end; a macro-batch larger
    than the epoch is cut to the epoch (and logged), so fewer train windows than the macro-batch
    still prune.

    Data-parallel (the pruner was built under an initialised torch.distributed group): every rank
    walks the same global micro-batches and takes its contiguous shard of each (tsprune.distributed),
    its loss scaled by shard / micro-batch so the summed mask gradients equal one process's; the
    pruner all-reduces once per macro-step; validation losses are summed over ranks. Progress and
    ``log`` on rank 0 only."""
    if val_tolerance < 0:
        raise ValueError(f"calibrate: val_tolerance must be >= 0, got {val_tolerance}")
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError(f"calibrate: epochs, batch_size and patience must be >= 1, got {epochs}, "
                         f"{batch_size}, {patience}")
    adapter = pruner.adapter
    ebs = eval_batch_size or batch_size
    notes: list[str] = []
    if pruner.macro_batch_size > len(train):
        notes.append(f"macro-batch cut from {pruner.macro_batch_size} to the epoch's {len(train)} train "
                     f"windows (else nothing would ever be pruned)")
        pruner.macro_batch_size = len(train)
    if pruner.samples_per_epoch is None or pruner.samples_per_epoch != len(train):
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
        if sharded and pruner.criterion.reads_weights:
            raise ValueError(f"calibrate: criterion {pruner.criterion.name!r} reads whole weights outside the "
                             "forward and is not supported on a sharded (FSDP) model yet; use taylor, "
                             "taylor2 or fisher")
    if pruner.compact is None:  # on by default here: pruned units then cost nothing (issue 11)
        if sharded:
            notes.append("compaction is off: the model is sharded (FSDP)")
        else:
            pruner.enable_compaction()
    elif pruner.compact and sharded:
        raise ValueError("calibrate: Pruner(compact=True) cannot rebuild a sharded (FSDP) model; use compact=False")
    for n_ in notes:
        if log:
            log(f"calibrate: {n_}")
    lname = loss_name(adapter)
    dev = _device(model)
    seed_everything(seed)
    with frozen(model):
        pruner.attach()
        best = (mean_loss(model, adapter, val, ebs, distributed=ddp), pruner.state_dict())
        lowest, lowest_epoch = best[0], 0
        hist = [{"epoch": 0, "val_loss": best[0], "pruned": pruner.pruned_fraction()}]
        if log:
            log(f"calibrate epoch 0 (no pruning): val {lname} {best[0]:.4f} over {len(val):,} windows")
        best_epoch, bad, seen, stop = 0, 0, 0, f"all {epochs} epochs ran"
        for ep in range(1, epochs + 1):
            # eval mode: no dropout and no BatchNorm statistics updates. Scores are gradients of the
            # function the model computes at inference; the weights (and statistics) stay frozen;
            # and a compacted model, whose dropout would draw different random numbers, scores
            # exactly what the full-size masked model scores.
            model.eval()
            pruner.start_epoch()
            it = batch_indices(len(train), batch_size, shuffle=True, seed=seed + ep)
            for idx in _progress(it, n_batches(train, batch_size), f"calibrate {ep}", progress):
                mine = D.shard(idx) if ddp else idx  # this rank's share of the global micro-batch
                if len(mine):
                    ctx, tgt = train.batch(mine)
                    loss = adapter.loss(model, ctx.to(dev), tgt.to(dev))
                    if len(mine) != len(idx):  # the loss is a batch mean: make it a share of the global one
                        loss = loss * (len(mine) / len(idx))
                    if loss.requires_grad:  # a compacted model may have no live mask left on any path
                        loss.backward()
                elif sharded:  # empty shard under FSDP: a zero-weight pass keeps the collectives paired
                    ctx, tgt = train.batch(idx[:1])
                    (adapter.loss(model, ctx.to(dev), tgt.to(dev)) * 0.0).backward()
                pruner.step(len(idx))
                seen += len(idx)
                if pruner.done:
                    break
            tail = pruner.pending_samples
            if pruner.finish_epoch() is not None and log:
                log(f"calibrate epoch {ep}: a macro step on the epoch's last {tail} windows (a partial macro-batch)")
            v = mean_loss(model, adapter, val, ebs, distributed=ddp)
            hist.append({"epoch": ep, "val_loss": v, "pruned": pruner.pruned_fraction(),
                         "macro_steps": pruner.macro_steps})
            if log:
                log(f"calibrate epoch {ep}: masked val {lname} {v:.4f}, {pruner.pruned_fraction():.1%} of "
                    f"units pruned so far ({pruner.macro_steps} macro steps)")
            if v < lowest:
                lowest, lowest_epoch = v, ep
            if v <= lowest * (1 + val_tolerance):
                best, best_epoch, bad = (v, pruner.state_dict()), ep, 0
            else:
                bad += 1
            if pruner.done:
                stop = f"stopped after epoch {ep}: the --max-prune-ratio cap was reached"
                break
            if bad >= patience:
                stop = f"stopped after epoch {ep}: {bad} epoch(s) without a kept improvement (patience {patience})"
                break
        pruner.load_state_dict(best[1])
        pruner.expand_()  # hand back the full-size masked model (plan / repack / save work on it)
    kept = hist[best_epoch]
    if best_epoch == 0:
        why = (f"no pruned epoch had a val {lname} within {val_tolerance:.2%} of the unpruned model's "
               f"{hist[0]['val_loss']:.4f}: NOTHING is pruned")
    elif best_epoch == lowest_epoch:
        why = f"it has the lowest masked val {lname} ({kept['val_loss']:.4f})"
    else:
        why = (f"it is the latest epoch whose masked val {lname} {kept['val_loss']:.4f} is within the "
               f"tolerance {val_tolerance:.2%} of the lowest ({lowest:.4f}, epoch {lowest_epoch})")
    later = [h for h in hist if h["epoch"] > best_epoch]
    if later:
        why += "; later epochs " + ", ".join(
            f"{h['epoch']} ({h['pruned']:.1%} pruned, {h['val_loss']:.4f})" for h in later) + " were worse"
    reason = (f"kept the masks of epoch {best_epoch} ({kept['pruned']:.1%} of units pruned) because {why}; {stop}")
    if log:
        log(f"calibrate: {reason}")
    return CalibrationResult(best_epoch=best_epoch, best_val_loss=best[0], windows=seen, history=hist,
                             reason=reason, macro_batch_size=pruner.macro_batch_size, notes=notes)


SCHEDULES = ("constant", "cosine")

#: The fine-tune settings of the CLI (``tsprune run / finetune``), measured on the embedded default
#: (ETTh1 h96): benchmarks/sweep_finetune.py chose 1200 steps of 128 with 5% warm-up + cosine and
#: selection by validation MSE; lr 1e-2 had the best validation MSE of 3e-4 ... 4e-2
#: (results/sweep_finetune.md, results/sweep_finetune_high_lr.md; benchmarks/README.md "Fine-tune
#: defaults"). ``finetune``'s own keyword defaults are the plain one-epoch loop;
#: ``finetune(model, adapter, train, val, **FINETUNE_DEFAULTS)`` trains as the CLI does.
FINETUNE_DEFAULTS = {"steps": 1200, "lr": 1e-2, "batch_size": 128, "warmup": 0.05, "schedule": "cosine",
                     "eval_every": 200, "select": "mse", "patience": 0}
SELECT = ("loss", "mse")


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base lr before optimiser step ``step`` (0-based) of ``total``: linear
    warm-up over ``warmup_steps`` (from 1/warmup_steps to 1), then constant or cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


#: LoRA fine-tuning imports peft lazily, only when asked for; without it, this one-line error.
_PEFT_HINT = "LoRA fine-tuning (lora / --lora-rank) needs the peft package: pip install peft"


def lora_settings(lora) -> dict | None:
    """Normalise ``finetune``'s ``lora`` argument: None / 0 (full fine-tuning) -> None; an int rank R
    or a dict ``{"rank": R, "alpha": A, "dropout": P}`` -> ``{"rank", "alpha", "dropout"}``.
    Defaults: alpha = 2 R (the update is scaled by alpha / R = 2), dropout 0."""
    if lora is None:
        return None
    if isinstance(lora, dict):
        extra = set(lora) - {"rank", "alpha", "dropout"}
        if extra or "rank" not in lora:
            raise ValueError(f"finetune: lora must be an int rank or a dict with 'rank' (and optional 'alpha', "
                             f"'dropout'), got {lora!r}")
        rank, alpha, dropout = lora["rank"], lora.get("alpha"), lora.get("dropout", 0.0)
    else:
        rank, alpha, dropout = lora, None, 0.0
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"finetune: the LoRA rank must be an int >= 0 (0: full fine-tuning), got {rank!r}")
    if rank == 0:
        return None
    alpha = 2.0 * int(rank) if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"finetune: the LoRA alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"finetune: the LoRA dropout must be in [0, 1), got {dropout!r}")
    return {"rank": int(rank), "alpha": float(alpha), "dropout": float(dropout)}


def _import_peft():
    try:
        import peft  # noqa: F401
        from peft import LoraConfig, LoraModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as e:
        raise ImportError(f"{_PEFT_HINT} ({type(e).__name__}: {e})") from None
    return LoraConfig, LoraModel, BaseTunerLayer


class _LoraHost(nn.Module):
    """A plain module holding the model while peft injects its layers: peft then sees no HF config
    and no ``_tied_weights_keys`` at the top (its tied-embedding probe calls get_input_embeddings,
    which e.g. Chronos-Bolt does not implement), and its bookkeeping attribute ``peft_config`` lands
    here, not on the model. Tied weights are handled by :func:`add_lora` itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def lora_targets(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """(paths of the nn.Linear modules LoRA wraps, {path: why not} for the Linears it leaves alone).

    Every nn.Linear is a target except one with an empty side (nothing to adapt) and one whose weight
    is shared with another parameter (e.g. classic Chronos's lm_head, tied to the token embedding:
    merging into it would also change the embedding, so the merged model would differ)."""
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    targets, skipped = [], {}
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear) or not path:
            continue
        if m.in_features == 0 or m.out_features == 0:
            skipped[path] = f"empty ({m.in_features} -> {m.out_features})"
            continue
        tied = [n for n in owners.get(id(m.weight), []) if n != f"{path}.weight"]
        if tied:
            skipped[path] = f"weight tied to {', '.join(tied)}"
            continue
        targets.append(path)
    return targets, skipped


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0) -> dict:
    """Wrap the model's nn.Linear layers (:func:`lora_targets`) in peft LoRA layers, in place: the
    model stays the same object and class (its adapter keeps working), every base parameter is frozen
    and only the LoRA A / B matrices train. peft's default init (A random, B = 0) leaves the model's
    function unchanged. Undo with :func:`merge_lora`. Returns the settings and counts."""
    cfg = lora_settings({"rank": rank, "alpha": alpha if alpha is not None else 2.0 * rank, "dropout": dropout})
    if cfg is None:
        raise ValueError("add_lora: rank must be >= 1")
    LoraConfig, LoraModel, BaseTunerLayer = _import_peft()
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("add_lora: the model already holds peft layers (merge_lora first)")
    targets, skipped = lora_targets(model)
    if not targets:
        raise ValueError(f"add_lora: {type(model).__name__} has no nn.Linear layer LoRA can wrap")
    pattern = "^(?:" + "|".join("model\\." + re.escape(t) for t in targets) + ")$"
    conf = LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"], target_modules=pattern,
                      bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. peft's notes on unknown model types
        LoraModel(_LoraHost(model), conf, "default")  # injects into ``model`` in place
    for n, p in model.named_parameters():  # peft freezes the base; make sure of it
        p.requires_grad_(".lora_" in n)
    wrapped = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
    if wrapped != len(targets):
        raise RuntimeError(f"add_lora: peft wrapped {wrapped} of the {len(targets)} Linear layers asked for")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**cfg, "modules": len(targets), "skipped": skipped, "trainable_params": trainable}


def merge_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Merge every peft LoRA layer of ``model`` into its base Linear's weight (W += alpha/rank B A;
    ``merge=False`` drops the adapters instead) and put the base nn.Linear back in its place, in place:
    the model then has exactly the module classes, parameter names and shapes it had before
    :func:`add_lora` and needs no peft to run, save or load. Returns ``model``."""
    _, _, BaseTunerLayer = _import_peft()
    for path, m in list(model.named_modules()):
        if not isinstance(m, BaseTunerLayer) or not path:
            continue
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        name = path.rpartition(".")[2]
        if getattr(parent, name, None) is not m:  # inside a wrapper already replaced
            continue
        if merge:
            m.merge(safe_merge=True)  # refuses to write a non-finite weight
        base = m.get_base_layer()
        base.train(m.training)
        setattr(parent, name, base)
    left = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]
    if left:
        raise RuntimeError(f"merge_lora: peft modules left in the model: {', '.join(left[:5])}")
    return model


@contextmanager
def _trainable(model: nn.Module, lcfg: dict | None):
    """Full fine-tuning: every parameter trainable. LoRA: adapters added inside, and on the way out
    merged (if ``run["merge"]`` was set) or dropped, peft layers removed, requires_grad flags restored."""
    run = {"lora": None, "merge": False}
    if lcfg is None:
        for p in model.parameters():
            p.requires_grad_(True)
        yield run
        return
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    run["lora"] = add_lora(model, **lcfg)
    try:
        yield run
    finally:
        merge_lora(model, merge=run["merge"])
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))



def val_score(model: nn.Module, adapter: Adapter, val: WindowDataset, select: str, batch_size: int,
              amp: str | None = None) -> float:
    """What :func:`finetune` selects by on ``val``: the point forecast's MSE over every window
    (``select="mse"``) or the model's own mean loss (``"loss"``). Lower is better."""
    if select == "mse":
        return float(evaluate(model, adapter, val, batch_size, amp=amp, warmup=False)["mse"])
    return mean_loss(model, adapter, val, batch_size, amp=amp)


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
    steps: int | None = None,
    warmup: float = 0.0,
    schedule: str = "constant",
    eval_every: int | None = None,
    select: str = "loss",
    amp: str | None = None,
    eval_batch_size: int | None = None,
    lora: int | dict | None = None,
    start_score: float | None = None,
) -> dict:
    """Stage 2 (docs/METHOD.md): every weight trainable, AdamW, selection on validation.

    Budget: ``steps`` optimiser steps (as many epochs over shuffled ``train`` as that takes), else
    ``epochs`` epochs, optionally cut at ``max_steps``. ``warmup`` (a fraction of the budget when
    < 1, else steps) of linear warm-up, then ``schedule`` "constant" or "cosine" (to 0 at the end).

    Validation every ``eval_every`` steps (default: at each epoch's end) and at the end of the
    budget, on ``select``: "loss" (the model's own training loss, :func:`loss_name`) or "mse" (the
    point forecast's MSE, the reported metric). The weights with the best validation score are
    kept (the starting weights count as evaluation 0); ``patience`` evaluations in a row without
    improvement stop training early (0: never stop early). What was kept and why is logged and
    returned: ``kept_step``, ``kept_epoch``, ``kept_val``, ``reason``; ``kept_step == 0`` means no
    evaluation beat the starting weights (logged as a warning).

    ``amp="bf16"``: forward passes (training and validation) under bf16 autocast; weights,
    gradients and optimiser state stay float32.

    ``lora``: None or 0 trains every weight (the default); a rank R (or ``{"rank": R, "alpha": A,
    "dropout": P}``, defaults alpha 2 R, dropout 0; :func:`lora_settings`) trains LoRA adapters
    instead (the ``peft`` library, :func:`add_lora`): every nn.Linear gets rank-R A / B matrices, the
    base weights stay frozen, selection keeps the best adapter weights as above, and at the end the
    kept adapters are MERGED into the base weights and every peft layer is removed
    (:func:`merge_lora`): the model keeps its module classes, parameter names and (pruned) shapes and
    needs no peft to run, save or load. The starting model kept (``kept_step == 0``) is returned
    exactly. On an error the adapters are dropped and the model is left as it came.

    ``start_score``: the validation score under ``select`` (:func:`val_score` with
    ``eval_batch_size``) of the model AS PASSED, when the caller
    already has it (several fine-tunes from one starting model, each at a long rolled-out horizon):
    used as evaluation 0 instead of computing it again. Passing a number that is not that score
    changes which weights are kept.

    Returns a dict with ``best_val_loss`` (the kept validation score under ``select``),
    ``history`` (one entry per evaluation), ``lora`` (None, or the LoRA settings with the number of
    wrapped ``modules``, the ``skipped`` Linears and why, and ``trainable_params``) and the above."""
    if select not in SELECT:
        raise ValueError(f"finetune: select must be one of {SELECT}, got {select!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"finetune: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if lr < 0 or not math.isfinite(lr):
        raise ValueError(f"finetune: lr must be a finite number >= 0, got {lr}")
    if batch_size < 1 or (steps is not None and steps < 0) or epochs < 0 or patience < 0:
        raise ValueError(f"finetune: batch_size >= 1, steps >= 0, epochs >= 0, patience >= 0 needed, "
                         f"got {batch_size}, {steps}, {epochs}, {patience}")
    autocast(amp)  # validates amp
    lcfg = lora_settings(lora)
    ebs = eval_batch_size or batch_size
    per_epoch = n_batches(train, batch_size)
    total = int(steps) if steps is not None else epochs * per_epoch
    if max_steps:
        total = min(total, int(max_steps))
    every = int(eval_every) if eval_every else per_epoch
    warm = int(round(warmup * total)) if warmup < 1 else int(warmup)
    lname = loss_name(adapter)
    metric = "MSE" if select == "mse" else lname
    dev = _device(model)

    def score() -> float:
        return val_score(model, adapter, val, select, ebs, amp=amp)

    seed_everything(seed)
    with _trainable(model, lcfg) as run:
        lora_info = run["lora"]
        params = [p for p in model.parameters() if p.requires_grad]
        if lora_info is None:
            snapshot = lambda: copy.deepcopy(model.state_dict())  # noqa: E731
        else:  # the base weights are frozen: keep the adapters and the buffers (e.g. BatchNorm statistics)
            keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
            snapshot = lambda: {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}  # noqa: E731
            if log:
                log(f"finetune: LoRA rank {lora_info['rank']} (alpha {lora_info['alpha']:g}, dropout "
                    f"{lora_info['dropout']:g}) on {lora_info['modules']} Linear layers (peft): "
                    f"{lora_info['trainable_params']:,} trainable parameters; base weights frozen"
                    + (f"; not wrapped: {', '.join(f'{k} ({v})' for k, v in lora_info['skipped'].items())}"
                       if lora_info["skipped"] else ""))
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm, schedule))
        t0 = time.time()
        best_val = score() if start_score is None else float(start_score)
        best_state = snapshot()
        kept_step, kept_epoch = 0, 0
        hist = [{"step": 0, "epoch": 0, "val": best_val, "val_metric": metric}]
        hist[0]["val_loss"] = best_val  # older readers
        if log:
            log(f"finetune: {total} steps of batch {batch_size} ({total * batch_size / max(len(train), 1):.2f} "
                f"epochs over {len(train):,} train windows), lr {lr:g}, warm-up {warm} steps, {schedule} "
                f"schedule{', bf16 autocast' if amp else ''}; validation every {every} steps on {len(val):,} "
                f"windows by {metric}; start: val {metric} {best_val:.4f}")
        bad, step, ep, run_loss, run_n = 0, 0, 0, 0.0, 0
        stop = f"the budget of {total} steps ran out"
        stopped_early = False
        while step < total:
            ep += 1
            model.train()
            it = train.iter_batches(batch_size, shuffle=True, seed=seed + 1000 + ep)
            for ctx, tgt in _progress(it, min(per_epoch, total - step), f"finetune {ep}", progress):
                opt.zero_grad(set_to_none=True)
                with autocast(amp, dev):
                    loss = adapter.loss(model, ctx.to(dev), tgt.to(dev))
                loss.backward()
                if grad_clip:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                sched.step()
                step += 1
                run_loss += float(loss.detach())
                run_n += 1
                end_of_epoch = step % per_epoch == 0
                if step % every == 0 or step == total or (eval_every is None and end_of_epoch):
                    v = score()
                    h = {"step": step, "epoch": ep, "val": v, "val_metric": metric, "val_loss": v,
                         "train_loss": run_loss / max(run_n, 1), "lr": opt.param_groups[0]["lr"]}
                    run_loss, run_n = 0.0, 0
                    improved = v < best_val
                    if improved:
                        best_val, best_state, kept_step, kept_epoch, bad = v, snapshot(), step, ep, 0
                    else:
                        bad += 1
                    h["kept"] = improved
                    hist.append(h)
                    if log:
                        log(f"finetune step {step}/{total} (epoch {ep}): train {lname} {h['train_loss']:.4f} "
                            f"(mean since the last check), val {metric} {v:.4f}"
                            + (" (best so far: kept)" if improved else
                               f" (no gain on {best_val:.4f}: {bad} in a row" + (f", patience {patience})" if patience else ")")))
                    model.train()
                    if patience and bad >= patience and step < total:
                        stop = f"stopped early at step {step}: {bad} validation checks in a row without a gain (patience {patience})"
                        stopped_early = True
                        break
                if step >= total:
                    break
            if stopped_early:
                break
        if lora_info is None:
            model.load_state_dict(best_state)
        else:
            res = model.load_state_dict(best_state, strict=False)
            if res.unexpected_keys:
                raise RuntimeError(f"finetune: unexpected keys restoring the kept LoRA weights: {res.unexpected_keys[:5]}")
            run["merge"] = kept_step > 0  # the start kept: dropping the adapters returns it exactly
    model.eval()
    n_checks = len(hist) - 1
    if kept_step == 0:
        reason = (f"kept the STARTING weights: none of {n_checks} validation checks beat the start's val "
                  f"{metric} {best_val:.4f}, so this model equals its starting point; {stop}")
        if log:
            log(f"finetune: WARNING: {reason}")
    else:
        reason = (f"kept the weights of step {kept_step} (epoch {kept_epoch}): the lowest val {metric} "
                  f"{best_val:.4f} of {n_checks + 1} checks (start {hist[0]['val']:.4f}); {stop}")
        if log:
            log(f"finetune: {reason}")
    return {"best_val_loss": best_val, "select": select, "val_metric": metric, "kept_step": kept_step,
            "kept_epoch": kept_epoch, "kept_val": best_val, "start_val": hist[0]["val"], "steps": step,
            "budget_steps": total, "stopped_early": stopped_early, "reason": reason, "lr": lr,
            "warmup_steps": warm, "schedule": schedule, "batch_size": batch_size, "amp": amp,
            "lora": None if lora_info is None else {k: lora_info[k] for k in ("rank", "alpha", "dropout", "modules",
                                                                            "trainable_params", "skipped")},
            "seconds": round(time.time() - t0, 2), "history": hist}
