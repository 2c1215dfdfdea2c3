"""Issue 11: calibration that gets cheaper as it prunes (Pruner(compact=True)), side by side in one
process, median after warm-up (benchmarks/_common.bench, runs interleaved round-robin).

(a) One calibration step (forward + backward, frozen weights, micro-batch ``--batch``) at
    Chronos-Bolt-small sizes (random init) AFTER one taylor macro-step that pruned about half the
    units: dense model without masks; plain PyTorch autograd masks (mask tensors with
    requires_grad on every Linear, the reference code's way) holding the same mask values; tsprune
    masks-only (compact=False); tsprune compacted (compact=True); the repacked model (frozen; the
    first layer's weight needs grad so backward traverses the stack, as in calibration).
(b) A whole calibration on ETTh1 windows with the model of ``--whole`` ("default": the embedded
    default; "small": Chronos-Bolt-small sizes, random init): EVERY row runs
    ``tsprune.train.calibrate`` with the same seed, batches, validation and schedule (by default
    the CLI's calibration defaults, ``CLI_SCHEDULE``); tsprune compacted vs tsprune masks-only vs
    plain autograd masks (the same arena scoring and global select, only the mask gradients come
    from autograd over mask tensors), wall / CPU time, windows/s, and how many units' final masks
    differ from masks-only's (0 = the same pruning decisions).

(c) ``--memory``: each row of (b) again, each in a fresh subprocess, reporting the process's peak
    resident memory during calibration (sampled every 2 ms from /proc) and its rise over the resident memory just before calibration
    starts (model, its host copy for compaction, data and arena all built), i.e. what the
    calibration loop itself adds at its peak. CPU only; on CUDA use torch.cuda.max_memory_allocated.

    python benchmarks/bench_compact.py [--batch 8] [--reps 3] [--tiny] [--whole default|small|none] [--memory]
        [--device cpu|cuda --dtype float32|bfloat16]  (device and dtype of (a))
        [--windows 16384 --epochs 4 --calib-batch 128 --macro 1024 --ratio 0.1 --val-windows 4096]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from _common import bench, write  # noqa: E402
from bench_pipeline import BOLT_SMALL, BOLT_TINY, attach_autograd_masks  # noqa: E402

import tsprune  # noqa: E402
from tsprune.pretrain import build_model  # noqa: E402


def _frozen(m):
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def _set_plain_masks(plain, pruner):
    """Copy the pruner's mask values (expanded over blocks) into the autograd-mask baseline."""
    masks = pruner.masks
    for s in pruner.sites:
        d = plain.get_submodule(s.path)._plain_masks
        for side, spec in (("in", s.mask_in), ("out", s.mask_out)):
            if spec is not None:
                with torch.no_grad():
                    d[side].copy_(masks[s.mask_name(side)].repeat_interleave(spec.block))


def _synced(cases: dict, dev: torch.device) -> dict:
    """On CUDA each timed call ends with a synchronize, so the wall time covers its kernels."""
    if dev.type != "cuda":
        return cases

    def wrap(f):
        def g():
            f()
            torch.cuda.synchronize(dev)
        return g
    return {k: wrap(f) for k, f in cases.items()}


def step_table(cfg, batch, reps, device="cpu", dtype=torch.float32):
    """(a) on ``device`` with the model's weights (and the inputs) in ``dtype``: on CUDA the
    masked Linears run tsprune's Triton path, the baseline plain autograd, both in that dtype."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_compact: --device {device}: no CUDA device here")
    base = _frozen(build_model(cfg, seed=0)).to(device=dev, dtype=dtype)
    L, H = cfg["chronos_config"]["context_length"], cfg["chronos_config"]["prediction_length"]
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(batch, L, generator=g).cumsum(-1).to(device=dev, dtype=dtype)
    tgt = ctx[:, -H:] + torch.randn(batch, H, generator=g).to(device=dev, dtype=dtype)

    runs = {}
    for name, compact in (("tsprune_masks_only", False), ("tsprune_compact", True)):
        m = copy.deepcopy(base)
        pr = tsprune.Pruner(m, criterion="taylor", prune_ratio_per_epoch=0.5, macro_batch_size=batch,
                            compact=compact).attach()
        pr.adapter.loss(m, ctx, tgt).backward()
        info = pr.step(batch)  # one macro-step: about half the live units (+ zero-score ones) go
        runs[name] = (m, pr, info)
    mo, pro, info = runs["tsprune_masks_only"]
    mc, prc, _ = runs["tsprune_compact"]
    same = all(torch.equal(a != 0, b != 0) for a, b in zip(pro.masks.values(), prc.masks.values()))
    plain = copy.deepcopy(base)
    mask_params = attach_autograd_masks(plain, pro.sites)
    _set_plain_masks(plain, pro)
    repacked = _frozen(pro.repack())
    dense = copy.deepcopy(base)
    req = {}
    for k, mm in (("dense", dense), ("repacked", repacked)):
        req[k] = next(mm.input_patch_embedding.parameters())
        req[k].requires_grad_(True)

    def fwd_bwd(mm, pr_):
        def f():
            pr_.adapter.loss(mm, ctx, tgt).backward()
            pr_.arena.zero_grad_()
            if pr_._phys is not None:
                pr_._phys.zero_()
        return f

    def plain_step():
        for mp in mask_params:
            mp.grad = None
        pro.adapter.loss(plain, ctx, tgt).backward()

    def unmasked(k, mm):
        def f():
            req[k].grad = None
            pro.adapter.loss(mm, ctx, tgt).backward()
        return f

    cases = {"dense_no_masks": unmasked("dense", dense), "autograd_masks": plain_step,
             "tsprune_masks_only": fwd_bwd(mo, pro), "tsprune_compact": fwd_bwd(mc, prc),
             "repacked": unmasked("repacked", repacked)}
    r = bench(_synced(cases, dev), warmup=1, reps=reps)
    d = r["dense_no_masks"]["median_ms"]
    for v in r.values():
        v["vs_dense"] = v["median_ms"] / d
    n = lambda mm: sum(p.numel() for p in mm.parameters())  # noqa: E731
    meta = {"device": str(dev), "dtype": str(dtype).replace("torch.", ""),
            "pruned_units_fraction": pro.pruned_fraction(), "params_dense": n(dense),
            "params_compacted": n(mc), "params_repacked": n(repacked), "same_masks": same,
            "macro_step": {"pruned": info.pruned, "live": info.live, "total": info.total}}
    print(f"(a) step after one macro-step ({meta['pruned_units_fraction']:.1%} of units pruned; batch {batch} x "
          f"context {L}; {meta['params_dense']:,} -> {meta['params_compacted']:,} parameters; {meta['device']}, "
          f"{meta['dtype']}):")
    for k, v in r.items():
        print(f"  {k:20s} {v['median_ms']:8.1f} ms  {v['vs_dense']:.2f}x dense")
    pro.detach()
    prc.detach()
    return {"steps": r, **meta}


def _use_autograd_masks(model, pruner):
    """The baseline of (b): the real Pruner, run by the SAME ``calibrate`` loop as tsprune (its own
    step / epoch counting, arena scoring and global select), but its masks are plain autograd mask
    tensors on every Linear side (the reference code's way) instead of the arena's kernels. Three
    of its methods are swapped on this instance only: ``attach`` puts the autograd masks on,
    ``prune_now`` first sums their gradients into the arena and afterwards copies the new masks
    back, ``load_state_dict`` copies the restored masks back. The Pruner must have compact=False."""
    import types

    slots = []
    real_prune, real_load = pruner.prune_now, pruner.load_state_dict

    def sync():
        with torch.no_grad():
            for t, name, blk in slots:
                t.copy_(pruner.masks[name].repeat_interleave(blk))

    def attach(self):
        if not slots:
            attach_autograd_masks(model, self.sites)
            for s_ in self.sites:
                d = model.get_submodule(s_.path)._plain_masks
                for side, spec in (("in", s_.mask_in), ("out", s_.mask_out)):
                    if spec is not None:
                        slots.append((d[side], s_.mask_name(side), spec.block))
        sync()
        return self

    def prune_now(self, ratio=None):
        with torch.no_grad():
            for t, name, blk in slots:
                if t.grad is not None:
                    self.arena.grad_view(name).add_(t.grad.view(-1, blk).sum(1))
                    t.grad = None
        info = real_prune(ratio)
        sync()
        return info

    def load_state_dict(self, sd):
        real_load(sd)
        sync()

    for f in (attach, prune_now, load_state_dict):
        setattr(pruner, f.__name__, types.MethodType(f, pruner))
    return pruner


def _rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRSS:
    """Samples this process's resident memory every ``dt`` seconds in a thread (ru_maxrss would
    also count the set-up's peaks); ``peak`` is the largest sample (MiB)."""

    def __init__(self, dt: float = 0.002):
        import threading
        self.dt, self.peak, self._stop = dt, _rss_mib(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.dt):
            self.peak = max(self.peak, _rss_mib())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mib())


#: (b)'s schedule by default: the CLI's calibration defaults (python/tsprune/cli.py: micro-batch
#: 128, macro-batch 1024, taylor, ema 0.5, ratio 0.1 per epoch, 4 epochs of 16,384 windows,
#: validation on 4,096 windows at batch 1024), all epochs run (patience = epochs).
CLI_SCHEDULE = dict(windows=16384, epochs=4, batch=128, macro=1024, ratio=0.1, val_windows=4096)
ROWS = ("tsprune_compact", "tsprune_masks_only", "autograd_masks")


def whole_calibration(which, windows=CLI_SCHEDULE["windows"], epochs=CLI_SCHEDULE["epochs"],
                      macro=CLI_SCHEDULE["macro"], only=None, batch=CLI_SCHEDULE["batch"],
                      ratio=CLI_SCHEDULE["ratio"], val_windows=CLI_SCHEDULE["val_windows"]):
    """(b): every row runs ``tsprune.train.calibrate`` with the same seed, batches, schedule and
    validation; only how the mask gradients are computed differs (module docstring)."""
    from tsprune.data import make_task
    from tsprune.models import load_model
    from tsprune.train import calibrate

    if which == "default":
        base = load_model("default")
    else:
        base = build_model(BOLT_SMALL, seed=0)
    task = make_task("ETTh1", lookback=base.config.chronos_config["context_length"], horizon=96,
                     max_train_windows=windows, max_eval_windows=val_windows or max(64, windows // 8))
    macro = macro or max(1, windows // 4)
    out, masks = {}, {}
    for name in ROWS:
        if only is not None and name != only:
            continue
        m = copy.deepcopy(base)
        pr = tsprune.Pruner(m, criterion="taylor", ema=0.5, prune_ratio_per_epoch=ratio,
                            macro_batch_size=macro, compact=name == "tsprune_compact")
        if name == "tsprune_compact":
            pr.enable_compaction()  # its host copy counts as set-up, like the model itself
        if name == "autograd_masks":
            _use_autograd_masks(m, pr)
        rss0 = _rss_mib()
        sampler = _PeakRSS() if only is not None else None
        if sampler is not None:
            sampler.__enter__()
        t, c = time.perf_counter(), time.process_time()
        calibrate(m, pr, task.train, task.val, epochs=epochs, batch_size=batch, val_tolerance=10.0,
                  patience=epochs, seed=0, eval_batch_size=1024)
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        if sampler is not None:
            sampler.__exit__(None, None, None)
        masks[name] = {k: v.clone() for k, v in pr.masks.items()}
        out[name] = {"wall_s": dt, "cpu_s": cpu, "windows_per_s": epochs * len(task.train) / dt,
                     "pruned_fraction": pr.pruned_fraction(), "macro_steps": pr.macro_steps,
                     "rss_before_mib": rss0}
        if sampler is not None:
            out[name]["peak_rss_mib"] = sampler.peak
    setup = {"model": which, "train_windows": len(task.train), "val_windows": len(task.val), "epochs": epochs,
             "batch": batch, "macro": macro, "ratio": ratio}
    if only is not None:
        return {**setup, "runs": out}
    ref = masks["tsprune_masks_only"]
    units = sum(v.numel() for v in ref.values())
    for name in out:
        differ = sum(int(((ref[k] != 0) != (masks[name][k] != 0)).sum()) for k in ref)
        out[name]["same_masks_as_masks_only"] = differ == 0
        out[name]["units_differing_from_masks_only"] = differ
        out[name]["speedup_vs_autograd"] = out["autograd_masks"]["wall_s"] / out[name]["wall_s"]
        out[name]["cpu_speedup_vs_autograd"] = out["autograd_masks"]["cpu_s"] / out[name]["cpu_s"]
    print(f"(b) whole calibration, {which} model, ETTh1 {len(task.train)} train windows x {epochs} epochs, "
          f"micro-batch {batch}, macro-batch {macro}, ratio {ratio}/epoch (validation on {len(task.val)} "
          "windows before and after every epoch in every row; CPU s = process time):")
    for k, v in out.items():
        print(f"  {k:20s} {v['wall_s']:8.1f} s wall {v['cpu_s']:8.1f} s CPU  {v['windows_per_s']:7.1f} windows/s  "
              f"{v['speedup_vs_autograd']:.2f}x autograd (CPU {v['cpu_speedup_vs_autograd']:.2f}x)  "
              f"{v['pruned_fraction']:.1%} pruned, {v['units_differing_from_masks_only']} of {units} units "
              "differ from masks-only")
    return {**setup, "runs": out}


def _sched_argv(sched: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in sched.items() if v is not None]


def memory_table(which, sched):
    """(c): every row of (b) in its own fresh process; peak RSS and its rise over the set-up."""
    rows = {}
    for name in ROWS:
        cmd = [sys.executable, os.path.abspath(__file__), "--no-step", "--whole", which, *_sched_argv(sched),
               "--only", name, "--json-only"]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        run = json.loads(r.stdout.strip().splitlines()[-1])["runs"][name]
        run["calibration_rise_mib"] = max(0.0, run["peak_rss_mib"] - run["rss_before_mib"])
        rows[name] = run
    print(f"(c) peak resident memory, {which} model, each row in a fresh process (MiB):")
    for k, v in rows.items():
        print(f"  {k:20s} before calibration {v['rss_before_mib']:8.1f}  peak {v['peak_rss_mib']:8.1f}  "
              f"rise {v['calibration_rise_mib']:7.1f}  ({v['wall_s']:.1f} s)")
    return {"model": which, "runs": rows}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny model for (a) (smoke test)")
    p.add_argument("--whole", default="default", choices=["default", "small", "none"])
    c = CLI_SCHEDULE
    p.add_argument("--windows", type=int, default=c["windows"], help="train windows per epoch of (b)")
    p.add_argument("--macro", type=int, default=c["macro"], help="macro-batch of (b)")
    p.add_argument("--epochs", type=int, default=c["epochs"])
    p.add_argument("--calib-batch", type=int, default=c["batch"], help="micro-batch of (b)")
    p.add_argument("--ratio", type=float, default=c["ratio"], help="prune ratio per epoch of (b)")
    p.add_argument("--val-windows", type=int, default=c["val_windows"], help="validation windows of (b)")
    p.add_argument("--no-step", action="store_true", help="skip (a)")
    p.add_argument("--device", default="cpu", help="device of (a): cpu or cuda (the GPU suite)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and inputs of (a)")
    p.add_argument("--memory", action="store_true", help="(c): peak memory of each row of (b), one process each")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one row of (b) (used by --memory)
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sched = dict(windows=a.windows, epochs=a.epochs, macro=a.macro, batch=a.calib_batch, ratio=a.ratio,
                 val_windows=a.val_windows)
    if a.only:
        res = whole_calibration(a.whole, only=a.only, **sched)
        print(json.dumps(res))
        return
    cfg = BOLT_TINY if a.tiny else BOLT_SMALL
    res = {"config": cfg, "batch": a.batch}
    if not a.no_step:
        res["step"] = step_table(cfg, a.batch, a.reps, a.device, getattr(torch, a.dtype))
    if a.whole != "none":
        res["whole"] = whole_calibration(a.whole, **sched)
    if a.memory and a.whole != "none":
        res["memory"] = memory_table(a.whole, dict(windows=a.windows, epochs=a.epochs, macro=a.macro,
                                                   calib_batch=a.calib_batch, ratio=a.ratio,
                                                   val_windows=a.val_windows))
    name = "compact" + ("_tiny" if a.tiny else "") + ("_step" if a.whole == "none" else "") + \
        (f"_whole_{a.whole}" if a.no_step else "") + \
        ("" if (a.device, a.dtype) == ("cpu", "float32") or a.no_step else f"_{a.device}_{a.dtype}")
    print("wrote", write(name, res))


if __name__ == "__main__":
    main()
