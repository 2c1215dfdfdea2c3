"""The ``tsprune`` command: prune, finetune, evaluate, and run (all settings and baselines in one go).

    tsprune run --data ETTh1 --horizon 96 --out runs/etth1      # zero-shot, fine-tune, prune-then-finetune
    tsprune run --search --seeds 3 --out runs/s                 # grid chosen on validation, 3 seeds
    tsprune run --search --seeds 3 --out runs/s --resume        # continue it after a stop (same options)
    tsprune prune --model default --data ETTh1 --out runs/p     # calibrate + repack + save
    tsprune finetune --model runs/p/pruned_model --data ETTh1 --out runs/f
    tsprune evaluate --model runs/f/model --data ETTh1
    torchrun --nproc_per_node=2 -m tsprune prune --data ETTh1 --out runs/p   # data-parallel calibration

Stage of the flow: glue only. Reads a model (models.py) and a task (data/), drives the Pruner and
the loops (train.py), scores the baselines (baselines.py), writes results (JSON + markdown table +
sparsity heatmap) atomically. Every bad option is refused at parse time, every file problem ends
as one line ``tsprune CMD: error: ...`` with exit status 2.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from .train import FINETUNE_DEFAULTS

# Fine-tune defaults: tsprune.train.FINETUNE_DEFAULTS (measured there; benchmarks/README.md
# "Fine-tune defaults").


def _log(msg: str) -> None:
    from . import distributed as D

    if D.is_main():  # under torchrun: rank 0 only
        print(msg, file=sys.stderr, flush=True)


def _write_json(path: pathlib.Path, obj) -> None:
    from .checkpoint import atomic_json

    atomic_json(path, obj)


def _write_text(path: pathlib.Path, text: str) -> None:
    _write_bytes(path, text.encode())


def _write_bytes(path: pathlib.Path, data: bytes) -> None:
    from .checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(data))


# --------------------------------------------------------------------------------------------------
# checks before any work
# --------------------------------------------------------------------------------------------------
def check_out_dir(spec: str, option: str = "--out") -> pathlib.Path:
    """Make sure ``spec`` is (or can become) a writable directory, before any work starts: creates
    it and writes + removes a probe file. Raises ValueError naming the option and the path."""
    p = pathlib.Path(spec).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{option} {p}: exists and is not a directory")
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    if q.exists() and not q.is_dir():
        raise ValueError(f"{option} {p}: {q} is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tsprune-write-check-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{option} {p}: cannot write there ({e.strerror or type(e).__name__}"
                         f"{': ' + e.filename if e.filename else ''})") from None
    return p


def _load(spec: str):
    """load_model, with every failure as one clean error naming the model."""
    from .models import load_model

    try:
        return load_model(spec)
    except (KeyboardInterrupt, SystemExit):
        raise
    except (OSError, ValueError) as e:
        msg = str(e)
        raise type(e)(msg if spec in msg or "default" == spec else f"--model {spec}: {msg}") from None
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line naming the model
        raise ValueError(f"--model {spec}: cannot load ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------
# task, metrics
# --------------------------------------------------------------------------------------------------
def _default_data() -> str:
    from .data import resolve_csv

    try:
        resolve_csv("ETTh1", download=False)
        return "ETTh1"
    except FileNotFoundError:
        return "synthetic"


def _task(a, model):
    from .data import make_task

    lookback = a.lookback or _context_length(model)
    data = a.data or _default_data()
    task = make_task(data, lookback, a.horizon, data_dir=a.data_dir, max_train_windows=a.max_train_windows,
                     max_eval_windows=a.max_eval_windows)
    cap = getattr(a, "max_val_windows", None)
    if cap:
        task.val = task.val.capped(cap)
    _log(task.describe())
    return task


def _context_length(model) -> int:
    cc = getattr(model, "chronos_config", None)
    if cc is not None:
        return int(cc.context_length)
    cfg = getattr(model, "config", None)
    for k in ("context_length", "context_len"):
        if cfg is not None and getattr(cfg, k, None):
            return int(getattr(cfg, k))
    return 512


def _metrics(model, adapter, ds, a) -> dict:
    """Test metrics of one model: every window of ``ds`` (or the cap), timed after warm-up."""
    from .models import n_params
    from .train import evaluate

    m = evaluate(model, adapter, ds, a.eval_batch_size, progress=a.progress, amp=a.amp)
    return {"mse": m["mse"], "mae": m["mae"], "params": n_params(model), "n_windows": m["windows"],
            "test_windows": m["windows"], "test_windows_available": ds.n_available,
            "n_values": m["values"], "eval_seconds": round(m["seconds"], 2),
            "ms_per_window": m["ms_per_window"]}


def _speed(models: dict, adapter, ds, a, reps: int = 3) -> dict:
    """Inference ms per window of each model, side by side: one batch of test windows (the eval
    batch size), a warm-up prediction each, then ``reps`` rounds predicting it with every model in
    turn; the median per model. The whole-pass ``eval_seconds`` of each evaluation is taken at a
    different time and moves with the machine's load; this is the number to compare models by."""
    import statistics as st

    from .train import _device, autocast

    n = min(a.eval_batch_size, len(ds))
    if n == 0:
        return {}
    ctx, tgt = ds.batch(np.arange(n))
    times = {k: [] for k in models}
    with torch.no_grad():
        for r in range(reps + 1):
            for k, m in models.items():
                m.eval()
                dev = _device(m)
                x = ctx.to(dev)
                t = time.perf_counter()
                with autocast(a.amp, dev):
                    adapter.predict(m, x, tgt.shape[-1])
                if r:  # round 0 is the warm-up
                    times[k].append(time.perf_counter() - t)
    return {k: round(1e3 * st.median(v) / n, 4) for k, v in times.items()}


def _val_mse(model, adapter, ds, a) -> float:
    """Validation MSE of one candidate (what --search ranks by)."""
    from .train import val_score

    return val_score(model, adapter, ds, "mse", a.eval_batch_size, amp=a.amp)


# --------------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------------
def _prune(model, task, a, heatmap: pathlib.Path | None, *, ratio=None, ema=None, seed=None):
    """Calibrate with masks, repack, check exactness; returns (pruned model, report dict). The
    sparsity heatmap is drawn to ``heatmap`` (rank 0 only; None: not drawn)."""
    from . import distributed as D
    from .plots import sparsity_heatmap
    from .pruner import Pruner
    from .train import calibrate, loss_name, mean_loss

    ratio = a.prune_ratio_per_epoch if ratio is None else ratio
    ema = a.ema if ema is None else ema
    seed = a.seed if seed is None else seed
    ddp = D.is_dist()  # under torchrun: data-parallel calibration, the model on this rank's device
    if ddp:
        model.to(D.comm_device())
    train = task.train  # --calib-windows caps the calibration epoch (never raises --max-train-windows)
    if a.calib_windows and a.calib_windows < len(train):
        train = train.capped(a.calib_windows)
    if len(train) < len(task.train):
        _log(f"calibrate: {len(train):,} of {len(task.train):,} train windows per epoch (--calib-windows)")
    pruner = Pruner(model, criterion=a.criterion, ema=ema, block=a.block, heads=a.heads,
                    prune_ratio_per_epoch=ratio, macro_batch_size=a.macro_batch_size,
                    samples_per_epoch=len(train), max_prune_ratio=a.max_prune_ratio, residual=a.residual or False,
                    layers=a.layers, compact=False if a.no_compact else None)
    _log(f"calibrate: criterion {a.criterion}, prune ratio per epoch {ratio:g}, ema {ema:g}, "
         f"macro-batch {a.macro_batch_size}, at most {a.calib_epochs} epochs, cap {a.max_prune_ratio:.0%} of units")
    t = time.time()
    cal = calibrate(model, pruner, train, task.val, epochs=a.calib_epochs, batch_size=a.batch_size,
                    patience=a.patience, val_tolerance=a.val_tolerance, seed=seed,
                    progress=a.progress and D.is_main(), log=_log, eval_batch_size=a.eval_batch_size)
    calib_s = time.time() - t
    masked_val = mean_loss(model, pruner.adapter, task.val, a.eval_batch_size, distributed=ddp)
    small = pruner.repack()
    pruner.detach()
    repacked_val = mean_loss(small, pruner.adapter, task.val, a.eval_batch_size, distributed=ddp)
    if ddp:
        small.cpu()  # fine-tuning, evaluation and saving run on the CPU, as in one process
    heat = None
    if heatmap is not None:
        heat = (sparsity_heatmap(pruner.sites, pruner.sparsity_by_site(), heatmap,
                                 title=f"{task.name}: units pruned per layer / module", points=pruner.points)
                if D.is_main() else heatmap)  # files: rank 0 only
    frac = pruner.pruned_fraction()
    report = {
        "pruned_units_fraction": frac,
        "nothing_pruned": frac == 0.0,
        "best_epoch": cal.best_epoch,
        "kept_because": cal.reason,
        "calibration": cal.history,
        "calibration_notes": cal.notes,
        "macro_batch_size": cal.macro_batch_size,
        "calibration_seconds": round(calib_s, 2),
        "calibration_windows": cal.windows,
        "calibration_windows_per_second": round(cal.windows / max(calib_s, 1e-9), 1),
        "loss": loss_name(pruner.adapter),
        "val_loss_masked": masked_val,
        "val_loss_repacked": repacked_val,
        "heatmap": str(heat) if heat else None,
        "sparsity_by_mask": pruner.sparsity_by_site(),
        "prune_ratio_per_epoch": ratio,
        "ema": ema,
    }
    extra = small.tsprune_plan.extra
    if pruner.residual == "shared":  # issue 13: the stream width kept and the sub-blocks removed
        m = pruner.masks["residual"]
        width = m.numel() * pruner.arena.slots["residual"].block
        report["residual_width"] = {"kept": len(extra.get("residual", range(width))), "of": width}
    if pruner.layers:
        report["sub_blocks_removed"] = sorted(k for k, v in extra.get("gates", {}).items() if v == 0)
    if ddp:
        report["distributed"] = {"world_size": D.world_size(), "backend": str(torch.distributed.get_backend()),
                                 **pruner.comm.stats}
    _log(f"pruned {frac:.1%} of units; val {report['loss']} masked {masked_val:.5f} vs repacked "
         f"{repacked_val:.5f} (must agree)")
    if frac == 0.0:
        _log("WARNING: NOTHING WAS PRUNED: the pruned model is the original one "
             f"({cal.reason}). Raise --prune-ratio-per-epoch / --calib-epochs or --val-tolerance.")
    return small, report


def _finetune(model, adapter, task, a, *, lr=None, seed=None, log=_log, start=None):
    from .train import finetune

    return finetune(model, adapter, task.train, task.val, epochs=a.ft_epochs or 0,
                    steps=None if a.ft_epochs else a.ft_steps, max_steps=a.ft_max_steps,
                    lr=a.lr if lr is None else lr, batch_size=a.batch_size, patience=a.ft_patience,
                    warmup=a.warmup, schedule=a.schedule, eval_every=a.eval_every, select=a.select,
                    weight_decay=a.weight_decay, amp=a.amp, eval_batch_size=a.eval_batch_size,
                    seed=a.seed if seed is None else seed, progress=a.progress, log=log,
                    lora=a.lora_rank or None, start_score=start)


def _kept_val_mse(model, adapter, task, a, h: dict) -> float:
    """Validation MSE of a fine-tuned candidate (what --search ranks by). Selection by val MSE
    without LoRA restores the kept weights exactly, so the score it kept them by IS this number
    (same windows, batch size and autocast): reused instead of a second pass over the validation
    set (at h720 one pass is ~100 forward passes per window). LoRA merges the adapters after
    selection (a rounding-level change) and loss selection scores something else: measured."""
    if h.get("select") == "mse" and h.get("lora") is None:
        return float(h["kept_val"])
    return _val_mse(model, adapter, task.val, a)


def _brief(h: dict) -> dict:
    """A fine-tune history without the per-check list (for search records)."""
    return {k: v for k, v in h.items() if k != "history"}


def _mean_std(rows: list[dict]) -> dict:
    out = {}
    for k in ("mse", "mae"):
        v = [r[k] for r in rows]
        out[k] = statistics.mean(v)
        out[f"{k}_std"] = statistics.stdev(v) if len(v) > 1 else 0.0
    return out


def _grids(a):
    ft = [{"lr": lr} for lr in (a.grid_lr if a.search else [a.lr])]
    ptf = [{"prune_ratio_per_epoch": r, "ema": e, "lr": lr}
           for r, e, lr in itertools.product(a.grid_prune_ratio if a.search else [a.prune_ratio_per_epoch],
                                             a.grid_ema if a.search else [a.ema],
                                             (a.grid_ptf_lr or a.grid_lr) if a.search else [a.lr])]
    return ft, ptf


def _run_spec(a, base, task) -> dict:
    """What a run's results depend on (the journal's run.json): every option except where the
    output goes, progress bars and --resume; the torch thread count (it changes how float sums
    are split, so --threads left unset on another machine is another run); the versions of the
    code; the model's bytes; the task's windows and the bytes of its scaled series. The git
    commit is not compared (a docs-only commit must not void hours of stages): each record
    carries the commit it was made at instead."""
    import hashlib
    from importlib import metadata

    from . import __version__
    from .journal import model_sha256

    skip = {"func", "out", "progress", "threads", "resume", "accept_remade_drift", "dist_timeout"}
    data = hashlib.sha256()
    for ds in (task.train, task.val, task.test):
        data.update(ds.series.tobytes())
    versions = {"tsprune": __version__, "torch": torch.__version__}
    for dist in ("transformers", "chronos-forecasting"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"options": {k: v for k, v in sorted(vars(a).items()) if k not in skip},
            "torch_threads": torch.get_num_threads(), "versions": versions,
            "model_sha256": model_sha256(base), "data_sha256": data.hexdigest(), "task": task.summary()}


def _git_commit() -> str | None:
    """The short commit of the checkout tsprune runs from, or None (an installed copy, no git)."""
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=pathlib.Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def cmd_run(a) -> dict:
    """zero-shot, fine-tune, prune-then-finetune and both baselines on one task; results table."""
    from . import distributed as D
    from .adapters import get_adapter
    from .baselines import run_baselines
    from .checkpoint import save_pruned
    from .journal import Journal, cpu_name
    from .plots import results_table

    if D.is_dist() and (a.search or a.seeds > 1):
        raise ValueError("--search and --seeds > 1 are not supported under torchrun yet (run them in one process)")
    if D.is_dist() and a.resume:
        raise ValueError("--resume is not supported under torchrun yet (run without it)")
    if a.accept_remade_drift and not a.resume:
        raise ValueError("--accept-remade-drift only applies to a resumed run: pass --resume too")
    out = pathlib.Path(a.out)
    Journal.refuse_unfinished(out / "progress", a.resume)  # before any work
    if D.is_main():
        check_out_dir(a.out)
    t0 = time.time()
    base = _load(a.model)
    adapter = get_adapter(base)
    task = _task(a, base)
    pre = None
    if D.is_dist():  # data-parallel calibration on every rank first; the rest runs on rank 0 alone
        pr = copy.deepcopy(base)
        pre = _prune(pr, task, a, out / "sparsity.png")
        del pr
        if not D.is_main():
            return {}
    # every finished stage is journaled under out/progress (--resume reads it back); not under
    # torchrun, where the calibration above ran on every rank before this point
    J = Journal(out / "progress", _run_spec(a, base, task) if pre is None else {}, resume=a.resume,
                enabled=pre is None, log=_log)
    commit, commits = _git_commit(), set()  # the commit each stage record was made at
    cpu, cpus = cpu_name(), set()  # and the CPU
    drift: list[dict] = []  # remade models that did not reproduce their records (--accept-remade-drift)
    from .train import seed_everything

    def stage(name: str, compute, say=None) -> dict:
        """The journal's record of ``name``, else ``compute()`` journaled; ``say(record)`` logs it.
        Every stage starts from the same seed, so none depends on which ran before it in this
        process (classic Chronos samples its forecasts from the global generator)."""
        rec = J.get(name)
        if rec is None:
            seed_everything(a.seed)
            rec = J.put(name, {**compute(), "_commit": commit, "_cpu": cpu})
        elif say:
            _log(f"resume: {name} read back")
        commits.add(rec.pop("_commit", None) or "unknown")
        cpus.add(rec.pop("_cpu", None) or "unknown")
        if say:
            say(rec)
        return rec

    def same_as_recorded(what: str, recorded, remade) -> None:
        """A model re-made on resume (its saved copy was lost, or never came with the records) must
        reproduce what its record says, else later stages would mix two different runs; with
        --accept-remade-drift the remade model goes on and results.json lists the difference."""
        if recorded == remade:
            return
        if a.accept_remade_drift:
            _log(f"resume: WARNING {what}, made again from its record, differs from it ({recorded!r} recorded, "
                 f"{remade!r} now); going on with the remade model (--accept-remade-drift)")
            drift.append({"what": what, "recorded": recorded, "remade": remade, "cpu": cpu, "commit": commit})
            return
        raise ValueError(f"--resume: {what}, made again from its record, differs from it ({recorded!r} "
                         f"recorded, {remade!r} now): the journal was made on another machine or build; "
                         f"remove {J.dir} to start over, or pass --accept-remade-drift to go on with the "
                         f"remade model (results.json lists the difference)")

    results: dict = {"config": {**{k: v for k, v in vars(a).items() if k != "func"}, "data": task.name},
                     "task": task.summary()}
    seeds = [a.seed + i for i in range(a.seeds)]
    ft_grid, ptf_grid = _grids(a)
    search = {"metric": "validation MSE", "budget": {"finetune": len(ft_grid), "prune_finetune": len(ptf_grid)},
              "val_windows": len(task.val),
              "val_windows_available": task.val.n_available, "finetune": [], "prune_finetune": []}

    results["zero_shot"] = stage("zero_shot", lambda: _metrics(base, adapter, task.test, a), lambda r: _log(
        f"zero-shot: test MSE {r['mse']:.4f}, MAE {r['mae']:.4f}"))
    results["baselines"] = stage("baselines", lambda: run_baselines(task))
    for k, v in results["baselines"].items():
        _log(f"baseline {k}: test MSE {v['mse']:.4f}, MAE {v['mae']:.4f}, {v['params']:,} params")

    # --- fine-tune: every candidate trained with the first seed, ranked by validation MSE
    # every fine-tune starts from `base`: its validation score (each one's evaluation 0) is computed once
    from .train import val_score

    base_start = None
    if len(ft_grid) * len(seeds) > 1:
        base_start = stage("base_val", lambda: {"score": val_score(base, adapter, task.val, a.select,
                                                                   a.eval_batch_size, amp=a.amp)})["score"]
    best_ft = None  # (val MSE, grid point, its model if in memory, history, index)
    for i, c in enumerate(ft_grid):
        if len(ft_grid) > 1:
            _log(f"search fine-tune {i + 1}/{len(ft_grid)}: lr {c['lr']:g}")
        m = None

        def one(c=c, i=i):
            nonlocal m
            m = copy.deepcopy(base)
            h = _finetune(m, adapter, task, a, lr=c["lr"], seed=seeds[0], start=base_start)
            v = _kept_val_mse(m, adapter, task, a, h)
            if best_ft is None or v < best_ft[0]:  # the best so far: saved before its record
                J.save_state("finetune_pick", m, f"finetune_grid_{i}")
            return {**c, "val_mse": v, "train": h}

        rec = stage(f"finetune_grid_{i}", one, (lambda r: _log(f"search fine-tune lr {r['lr']:g}: val MSE "
                                                                f"{r['val_mse']:.4f}")) if len(ft_grid) > 1 else None)
        v, h = rec["val_mse"], rec["train"]
        search["finetune"].append({**c, "val_mse": v, "train": _brief(h)})
        if best_ft is None or v < best_ft[0]:
            best_ft = (v, c, m, h, i)
        del m
    v, c, m, h, i = best_ft
    del best_ft

    def pick_ft():
        mm = m
        if mm is None:  # picked in an earlier process: its weights from the journal, else trained again
            mm = copy.deepcopy(base)
            if not J.load_state("finetune_pick", mm, f"finetune_grid_{i}"):
                h2 = _finetune(mm, adapter, task, a, lr=c["lr"], seed=seeds[0], start=base_start)
                same_as_recorded(f"the fine-tune pick (grid point {i}): validation MSE", v,
                                 _kept_val_mse(mm, adapter, task, a, h2))
        return {"seed": seeds[0], **_metrics(mm, adapter, task.test, a), "val_mse": v, "train": h}

    runs = [stage(f"finetune_seed_{seeds[0]}", pick_ft)]
    m = None  # the fine-tuned pick is not needed any more
    for s in seeds[1:]:
        def one(s=s):
            m = copy.deepcopy(base)
            h = _finetune(m, adapter, task, a, lr=c["lr"], seed=s, start=base_start)
            return {"seed": s, **_metrics(m, adapter, task.test, a), "val_mse": _kept_val_mse(m, adapter, task, a, h),
                    "train": h}

        runs.append(stage(f"finetune_seed_{s}", one))
    results["finetune"] = _setting(runs, c)
    results["finetune"]["lora_rank"] = a.lora_rank
    _log(f"finetune (lr {c['lr']:g}): test MSE {results['finetune']['mse']:.4f}"
         + (f" ± {results['finetune']['mse_std']:.4f} over {len(seeds)} seeds" if len(seeds) > 1 else ""))

    # --- prune-then-finetune: one calibration per (ratio, ema), every lr fine-tuned on its result
    keys = list(dict.fromkeys((c["prune_ratio_per_epoch"], c["ema"]) for c in ptf_grid))
    best_p = None  # (val MSE, grid point, its model if in memory, history, calibration index, index)
    held: dict = {}  # one calibration's pruned model in memory at a time
    cal_reps: dict[int, dict] = {}

    def calibration(k: int):
        """(pruned model, report) of calibration k: the DDP one, in memory, or read back, or run."""
        if pre is not None:
            return pre
        if k in held:
            return held[k]
        key, name = keys[k], f"calibration_{k}"
        small = None

        def run():
            nonlocal small
            pr = copy.deepcopy(base)
            small, rep = _prune(pr, task, a, J.path(f"{name}.png"), ratio=key[0], ema=key[1], seed=seeds[0])
            J.save_pruned(name, small, name)
            return rep

        rep = stage(name, run)
        if small is None:
            small = J.load_pruned(name, name)
            if small is None:  # its record without its model: calibrate again (same seed, same result)
                old = rep
                J.forget(name)
                rep = stage(name, run)
                for key2 in ("pruned_units_fraction", "val_loss_masked", "sparsity_by_mask"):
                    same_as_recorded(f"{name}: {key2}", old.get(key2), rep.get(key2))
        cal_reps[k] = rep
        held.clear()
        held[k] = (small, rep)
        return held[k]

    for i, c in enumerate(ptf_grid):
        k = keys.index((c["prune_ratio_per_epoch"], c["ema"]))
        if len(ptf_grid) > 1:
            _log(f"search prune-then-finetune {i + 1}/{len(ptf_grid)}: ratio {keys[k][0]:g}, ema {keys[k][1]:g}, "
                 f"lr {c['lr']:g}")
        m = None

        def one(c=c, i=i, k=k):
            nonlocal m
            small, rep = calibration(k)
            m = copy.deepcopy(small)
            h = _finetune(m, adapter, task, a, lr=c["lr"], seed=seeds[0])
            v = _kept_val_mse(m, adapter, task, a, h)
            if best_p is None or v < best_p[0]:
                J.save_pruned("prune_finetune_pick", m, f"prune_finetune_grid_{i}")
            return {**c, "val_mse": v, "pruned_units_fraction": rep["pruned_units_fraction"], "train": h}

        rec = stage(f"prune_finetune_grid_{i}", one, (lambda r: _log(
            f"search prune-then-finetune ratio {r['prune_ratio_per_epoch']:g}, ema {r['ema']:g}, lr {r['lr']:g}: "
            f"val MSE {r['val_mse']:.4f}")) if len(ptf_grid) > 1 else None)
        v, h = rec["val_mse"], rec["train"]
        search["prune_finetune"].append({**{k2: rec[k2] for k2 in ("prune_ratio_per_epoch", "ema", "lr", "val_mse",
                                                                    "pruned_units_fraction")}, "train": _brief(h)})
        if best_p is None or v < best_p[0]:
            best_p = (v, c, m, h, k, i)
        del m
        for k2 in range(len(keys)):  # calibrations no later grid point uses and not the best's: off disk
            if k2 != best_p[4] and all(keys.index((g["prune_ratio_per_epoch"], g["ema"])) != k2
                                       for g in ptf_grid[i + 1:]):
                J.drop(f"calibration_{k2}")
    v, c, m, h, k, i = best_p
    del best_p
    rep = pre[1] if pre is not None else cal_reps.get(k) or stage(f"calibration_{k}", lambda: calibration(k)[1])

    def picked_ptf_model():
        """The picked prune-then-finetune model: in memory, else read back, else trained again."""
        nonlocal m
        if m is None:  # picked in an earlier process
            m = J.load_pruned("prune_finetune_pick", f"prune_finetune_grid_{i}")
            if m is None:
                m = copy.deepcopy(calibration(k)[0])
                h2 = _finetune(m, adapter, task, a, lr=c["lr"], seed=seeds[0])
                same_as_recorded(f"the prune-then-finetune pick (grid point {i}): validation MSE", v,
                                 _kept_val_mse(m, adapter, task, a, h2))
        return m

    def pick_ptf():
        return {"seed": seeds[0], **_metrics(picked_ptf_model(), adapter, task.test, a), "val_mse": v, "train": h,
                "prune": rep}

    runs = [stage(f"prune_finetune_seed_{seeds[0]}", pick_ptf)]
    held.clear()
    for s in seeds[1:]:
        def one(s=s):
            pr = copy.deepcopy(base)
            sm, rp = _prune(pr, task, a, None, ratio=c["prune_ratio_per_epoch"], ema=c["ema"], seed=s)
            del pr
            h2 = _finetune(sm, adapter, task, a, lr=c["lr"], seed=s)
            return {"seed": s, **_metrics(sm, adapter, task.test, a), "val_mse": _kept_val_mse(sm, adapter, task, a, h2),
                    "train": h2, "prune": rp}

        runs.append(stage(f"prune_finetune_seed_{s}", one))
    keep_model = picked_ptf_model()  # needed below (speed, pruned_model)
    results["prune_finetune"] = _setting(runs, c)
    results["prune_finetune"]["prune"] = rep
    results["prune_finetune"]["lora_rank"] = a.lora_rank
    results["prune_finetune"]["pruned_units_fraction"] = statistics.mean(
        r["prune"]["pruned_units_fraction"] for r in runs)
    results["nothing_pruned"] = any(r["prune"]["nothing_pruned"] for r in runs)
    if pre is None:  # the picked calibration's heatmap
        png = J.path(f"calibration_{k}.png").read_bytes()
        _write_bytes(out / "sparsity.png", png)
        rep["heatmap"] = str(out / "sparsity.png")
    zp = results["zero_shot"]["params"]
    for key in ("zero_shot", "finetune", "prune_finetune"):
        results[key]["params_removed_fraction"] = 1.0 - results[key]["params"] / zp
    results["zero_shot"]["pruned_units_fraction"] = results["finetune"]["pruned_units_fraction"] = 0.0
    _log(f"prune-then-finetune (ratio {c['prune_ratio_per_epoch']:g}, ema {c['ema']:g}, lr {c['lr']:g}): "
         f"test MSE {results['prune_finetune']['mse']:.4f}, {results['prune_finetune']['params']:,} params")
    # inference speed side by side (fine-tune has the zero-shot model's shapes: the same speed)
    sp = _speed({"full": base, "pruned": keep_model}, adapter, task.test, a)
    if sp:
        for key, which in (("zero_shot", "full"), ("finetune", "full"), ("prune_finetune", "pruned")):
            results[key]["ms_per_window"] = sp[which]
        results["speed"] = {"ms_per_window": sp, "speedup": round(sp["full"] / max(sp["pruned"], 1e-12), 3),
                            "windows": min(a.eval_batch_size, len(task.test)), "method":
                            "median of 3 interleaved predictions of one batch of test windows after a warm-up"}
        _log(f"inference: {sp['full']:.3f} ms / window full, {sp['pruned']:.3f} pruned "
             f"({results['speed']['speedup']:.2f}x), measured side by side")
    if a.search:
        search["picked"] = {"finetune": results["finetune"]["hyper"], "prune_finetune": results["prune_finetune"]["hyper"]}
        results["search"] = search
    results["stage_commits"] = sorted(commits)  # more than one: a resumed run spanning commits
    results["stage_cpus"] = sorted(cpus)  # more than one: a resumed run spanning machines
    if drift:
        results["resume_drift"] = drift
    if J.resumed:  # "seconds" below is this process's part only
        results["resumed_stages"] = sorted(set(J.resumed))
    save_pruned(keep_model, out / "pruned_model", extra={"data": task.name, "horizon": a.horizon})
    results["seconds"] = round(time.time() - t0, 1)
    _write_json(out / "results.json", results)
    table = results_table(results)
    head = (f"# tsprune run: {task.name}, horizon {a.horizon}, lookback {task.lookback}\n\n"
            f"Test MSE / MAE on scaled values; {len(seeds)} seed(s)"
            + (", settings picked by validation MSE (--search)" if a.search else "") + ".\n\n")
    if results["nothing_pruned"]:
        head += "**WARNING: nothing was pruned: the prune-then-finetune model is unpruned.**\n\n"
    _write_text(out / "results.md", f"{head}{table}\n")
    J.finish()  # everything is written: the journal goes
    print(table)
    if results["nothing_pruned"]:
        print("\nWARNING: nothing was pruned (results.json: nothing_pruned = true)")
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'sparsity.png'}, {out / 'pruned_model'} "
          f"({results['seconds']:.0f} s)")
    return results


def _setting(runs: list[dict], hyper: dict) -> dict:
    """One row of results.json from its per-seed runs: mean metrics (and std with seeds)."""
    first = runs[0]
    row = {k: first[k] for k in ("mse", "mae", "params", "n_windows", "test_windows", "test_windows_available",
                                 "n_values", "eval_seconds", "ms_per_window", "val_mse")}
    row["train"] = first["train"]
    row["hyper"] = hyper
    if len(runs) > 1:
        row.update(_mean_std(runs))
        row["val_mse"] = statistics.mean(r["val_mse"] for r in runs)
        row["seeds"] = [{"seed": r["seed"], "mse": r["mse"], "mae": r["mae"], "val_mse": r["val_mse"]} for r in runs]
    return row


def cmd_prune(a) -> dict:
    """calibrate masks on a task, repack to a smaller model, save it."""
    from . import distributed as D
    from .models import n_params
    from .checkpoint import save_pruned

    out = pathlib.Path(a.out)
    if D.is_main():
        check_out_dir(a.out)
    model = _load(a.model)
    task = _task(a, model)
    before = n_params(model)
    small, rep = _prune(model, task, a, out / "sparsity.png")
    rep.update(params_before=before, params_after=n_params(small),
               params_removed_fraction=1.0 - n_params(small) / before)
    if D.is_main():  # under torchrun every rank holds the same pruned model; rank 0 writes it
        save_pruned(small, out / "pruned_model", extra={"data": task.name})
        _write_json(out / "prune.json", rep)
        print(f"params {before:,} -> {rep['params_after']:,} ({rep['params_removed_fraction']:.1%} removed, "
              f"{rep['pruned_units_fraction']:.1%} of units pruned); saved {out / 'pruned_model'}")
    D.barrier("final barrier (rank 0 writing the results)")  # a failed write fails every rank
    return rep


def cmd_finetune(a) -> dict:
    """fine-tune a model (e.g. a pruned one) on a task, keep the best on validation, save it."""
    from .adapters import get_adapter
    from .checkpoint import save_pruned

    out = pathlib.Path(a.out)
    check_out_dir(a.out)
    model = _load(a.model)
    adapter = get_adapter(model)
    task = _task(a, model)
    hist = _finetune(model, adapter, task, a)
    res = {**_metrics(model, adapter, task.test, a), "lora_rank": a.lora_rank, "train": hist}
    save_pruned(model, out / "model", extra={"data": task.name, "finetuned": True})
    _write_json(out / "finetune.json", res)
    print(f"test MSE {res['mse']:.4f} MAE {res['mae']:.4f} on {_windows(res)}; saved {out / 'model'}")
    return res


def _windows(r: dict) -> str:
    n, m = r["test_windows"], r["test_windows_available"]
    return f"{n:,} test windows" if n == m else f"{n:,} of {m:,} test windows"


def cmd_evaluate(a) -> dict:
    """test MSE / MAE of a model on a task (every test window unless capped)."""
    from .adapters import get_adapter

    if a.out:
        check_out_dir(a.out)
    model = _load(a.model)
    task = _task(a, model)
    res = _metrics(model, get_adapter(model), task.test, a)
    print(json.dumps(res, indent=1))
    if a.out:
        _write_json(pathlib.Path(a.out) / "evaluate.json", res)
    return res


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Parse errors as ONE line naming the option (``tsprune run: error: argument --x: ...``)."""

    def error(self, message):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _num(kind, lo=None, hi=None, lo_open=False, hi_open=False, none_word=None):
    """argparse type: a number of ``kind`` in [lo, hi] (open ends with *_open); ``none_word``
    (e.g. "all") parses to None."""

    def parse(s: str):
        if none_word is not None and s.strip().lower() == none_word:
            return None
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}")
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {s}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {s}")
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi}, got {s}")
        return v

    parse.__name__ = kind.__name__
    return parse


def _num_list(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    one = _num(kind, lo, hi, lo_open, hi_open)

    def parse(s: str):
        vals = [one(x) for x in s.split(",") if x.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
        return vals

    parse.__name__ = "list"
    return parse


def _fmt(v) -> str:
    return ",".join(f"{x:g}" for x in v)


def build_parser() -> argparse.ArgumentParser:
    F = argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(prog="tsprune", formatter_class=F,
                description="Structured pruning for time series foundation models: prune on the downstream "
                            "task, then fine-tune the smaller model. `tsprune CMD --help` lists each command's "
                            "options with their defaults.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="CMD", parser_class=_Parser)
    pos, pos1, nonneg = _num(int, 1), _num(float, 0.0, lo_open=True), _num(float, 0.0)
    ratio = _num(float, 0.0, 1.0)

    def common(sp, out_required=True):
        g = sp.add_argument_group("model and data")
        g.add_argument("--model", default="default",
                       help="'default' (the embedded model) | a tsprune save dir | a local checkpoint dir | "
                            "a hub name org/name")
        g.add_argument("--data", default=None,
                       help="CSV path or name (ETTh1, ETTh2, exchange_rate, ...); default: ETTh1 if found, "
                            "else the bundled synthetic task")
        g.add_argument("--data-dir", default=None, help="folder of CSVs searched first (also $TSPRUNE_DATA_DIR)")
        g.add_argument("--horizon", type=pos, default=96, help="forecast length (>= 1)")
        g.add_argument("--lookback", type=pos, default=None, help="context length (>= 1); default: the model's")
        g.add_argument("--out", required=out_required, default=None,
                       help="output directory (created; checked writable before any work)")
        g.add_argument("--max-train-windows", type=pos, default=None,
                       help="cap on the train windows (evenly spaced); default: all")
        g.add_argument("--max-val-windows", type=pos, default=4096,
                       help="cap on the validation windows used for every validation check and for --search "
                            "(evenly spaced; the log says N of M)")
        g.add_argument("--max-eval-windows", type=pos, default=None,
                       help="cap on the TEST windows (evenly spaced; the table then says N of M); default: all, "
                            "the standard protocol (stride 1)")
        g = sp.add_argument_group("execution")
        g.add_argument("--batch-size", type=pos, default=FINETUNE_DEFAULTS["batch_size"], help="micro-batch of calibration and fine-tuning")
        g.add_argument("--eval-batch-size", type=pos, default=1024, help="batch of evaluation and validation")
        g.add_argument("--amp", default=None, choices=["bf16"],
                       help="bf16 autocast for fine-tuning and evaluation (CPUs with bf16 support, GPUs); "
                            "default: off (float32)")
        g.add_argument("--seed", type=int, default=0, help="seed of shuffling and initialisation")
        g.add_argument("--threads", type=pos, default=None, help="torch CPU threads; default: torch's choice")
        g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
        g.add_argument("--dist-timeout", type=pos1, default=None,
                       help="under torchrun: seconds any collective may wait before the run fails "
                            "(default $TSPRUNE_DIST_TIMEOUT or 600)")

    def prune_args(sp):
        from .criteria import criterion_names  # registered criteria, user ones included

        g = sp.add_argument_group("pruning (stage 1: calibration with masks)")
        g.add_argument("--criterion", default="taylor", choices=criterion_names(),
                       help="importance score of a unit")
        g.add_argument("--ema", type=ratio, default=0.5, help="smoothing of the scores across macro steps, in [0, 1]")
        g.add_argument("--block", type=pos, default=1, help="channels per FFN unit")
        g.add_argument("--heads", action="store_true", help="attention units are whole heads (else head dims)")
        g.add_argument("--prune-ratio-per-epoch", type=ratio, default=0.1,
                       help="fraction of the live units pruned per calibration epoch, in [0, 1] (units with importance exactly 0 go at every step, even at 0)")
        g.add_argument("--macro-batch-size", type=pos, default=1024,
                       help="windows per pruning step (cut to the epoch when larger)")
        g.add_argument("--max-prune-ratio", type=_num(float, 0.0, 1.0, hi_open=True), default=0.8,
                       help="stop ranking units once this fraction of all units is pruned, in [0, 1) (units with importance exactly 0 still go, so the result can exceed it)")
        g.add_argument("--calib-epochs", type=pos, default=4, help="at most this many calibration epochs")
        g.add_argument("--calib-windows", type=pos, default=16384,
                       help="train windows per calibration epoch (evenly spaced subset)")
        g.add_argument("--patience", type=pos, default=1,
                       help="calibration: epochs without a kept validation gain before stopping")
        g.add_argument("--val-tolerance", type=nonneg, default=0.001,
                       help="keep the latest masks whose val loss is within this relative tolerance of the best "
                            "(0: keep the best)")
        g.add_argument("--residual", nargs="?", const="shared", choices=("shared", "paper"), default=None,
                       help="also prune the residual stream: 'shared' (the default with the flag alone): one mask "
                            "over the stream, removed from the whole model by repack (Chronos-Bolt, Chronos, TimesFM, Chronos-2); "
                            "'paper': the paper's per-Linear residual masks, whose zeros stay as zero weights")
        g.add_argument("--layers", action="store_true",
                       help="also prune whole sub-blocks: one gate per attention / FFN sub-block; a gated-off "
                            "sub-block is removed by repack (Chronos-Bolt, Chronos, TimesFM, Chronos-2)")
        g.add_argument("--no-compact", action="store_true",
                       help="calibrate on the full-size masked model (default: after every macro-step that "
                            "prunes, the model is shrunk to its live units, exactly; pruned units cost nothing)")

    def ft_args(sp):
        g = sp.add_argument_group("fine-tuning (stage 2)")
        g.add_argument("--lr", type=_num(float, 0.0), default=FINETUNE_DEFAULTS["lr"], help="AdamW learning rate")
        g.add_argument("--ft-steps", type=pos, default=FINETUNE_DEFAULTS["steps"], help="optimiser-step budget")
        g.add_argument("--ft-epochs", type=pos, default=None,
                       help="budget in epochs over the train windows instead of --ft-steps")
        g.add_argument("--ft-max-steps", type=pos, default=None, help="hard cap on the optimiser steps")
        g.add_argument("--warmup", type=nonneg, default=FINETUNE_DEFAULTS["warmup"],
                       help="linear lr warm-up: a fraction of the budget (< 1) or a number of steps")
        g.add_argument("--schedule", default=FINETUNE_DEFAULTS["schedule"], choices=["cosine", "constant"], help="lr after the warm-up")
        g.add_argument("--weight-decay", type=nonneg, default=0.0, help="AdamW weight decay")
        g.add_argument("--eval-every", type=pos, default=FINETUNE_DEFAULTS["eval_every"],
                       help="validation check every this many steps (and at the end); the best check is kept")
        g.add_argument("--select", default=FINETUNE_DEFAULTS["select"], choices=["mse", "loss"],
                       help="what the checks compare: validation MSE (the reported metric) or the model's own loss")
        g.add_argument("--ft-patience", type=_num(int, 0), default=FINETUNE_DEFAULTS["patience"],
                       help="stop after this many checks in a row without a gain (0: run the whole budget)")
        g.add_argument("--lora-rank", type=_num(int, 0), default=0,
                       help="train rank-R LoRA adapters on every Linear (peft; alpha 2R) instead of every "
                            "weight, merged into the weights at the end: the saved model needs no peft "
                            "(0: full fine-tuning)")

    def run_args(sp):
        g = sp.add_argument_group("selection and seeds")
        g.add_argument("--search", action="store_true",
                       help="pick each setting's hyper-parameters by validation MSE over the --grid-* grids "
                            "(only the picks are scored on test); results.json 'search' records the grid")
        # Equal budgets and the same rates by default: 4 lrs for each setting, prune-then-finetune
        # at one ratio and ema (its calibration already picks how much to prune on validation), so
        # neither setting wins by being searched harder or over a wider range.
        g.add_argument("--grid-lr", type=_num_list(float, 0.0), default=[5e-3, 1e-2, 2e-2, 4e-2],
                       help="lr grid of the fine-tune setting (and of prune-then-finetune unless --grid-ptf-lr)")
        g.add_argument("--grid-ptf-lr", type=_num_list(float, 0.0), default=None,
                       help="lr grid of the prune-then-finetune setting (crossed with the ratio and ema "
                            "grids); default: --grid-lr")
        g.add_argument("--grid-prune-ratio", type=_num_list(float, 0.0, 1.0), default=[0.1],
                       help="prune_ratio_per_epoch grid")
        g.add_argument("--grid-ema", type=_num_list(float, 0.0, 1.0), default=[0.5], help="ema grid")
        g.add_argument("--seeds", type=pos, default=1,
                       help="repeat the fine-tune and prune-then-finetune picks with this many seeds (seed, "
                            "seed+1, ...) and report mean and std")
        g.add_argument("--resume", action="store_true",
                       help="continue the unfinished run in --out from its journal (--out/progress: every "
                            "finished fine-tune, calibration and test pass is read back, not re-run); the "
                            "options, thread count, code versions, model and data must be the ones it "
                            "was started with")
        g.add_argument("--accept-remade-drift", action="store_true",
                       help="with --resume: a model made again because its saved copy is gone (records "
                            "moved to another machine) that does not reproduce its record exactly is kept "
                            "with a warning and listed in results.json 'resume_drift' (the recorded numbers "
                            "stay as measured); without it the run stops there")

    cmds = (("run", cmd_run, (prune_args, ft_args, run_args)), ("prune", cmd_prune, (prune_args,)),
            ("finetune", cmd_finetune, (ft_args,)), ("evaluate", cmd_evaluate, ()))
    for name, fn, extra in cmds:
        sp = sub.add_parser(name, help=fn.__doc__, description=fn.__doc__, formatter_class=F)
        common(sp, out_required=name != "evaluate")
        for f in extra:
            f(sp)
        sp.set_defaults(func=fn)
    return p


def _one_line(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def main(argv=None) -> int:
    from . import distributed as D

    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    own_group = False
    try:
        # torchrun --nproc_per_node=N -m tsprune ...: one process group (gloo on CPU, nccl on GPUs)
        own_group = D.init_from_env(timeout_s=a.dist_timeout)
        a.func(a)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, AttributeError, ImportError) as e:
        where = f" (rank {D.rank()}/{D.world_size()})" if D.is_dist() or D.launched() else ""
        print(f"tsprune {a.cmd}: error{where}: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        if own_group:
            D.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
