"""Issue 11 (b), the Torch-Pruning row: the same calibration schedule as bench_compact.py (b) with
Torch-Pruning's GroupTaylorImportance, which scores from WEIGHT gradients (so every micro-batch
runs the full backward with weight gradients), global pruning at every macro-step with
``MetaPruner.step()`` (which shrinks the model physically), the same batches in the same order
(tsprune.data.batch_indices, seed + epoch) and the same validation as ``tsprune.train.calibrate``.

torch-pruning is NOT a tsprune dependency: run this in an environment of its own, e.g.

    python -m venv --system-site-packages /tmp/tpenv
    /tmp/tpenv/bin/pip install torch-pruning "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
    OMP_NUM_THREADS=1 /tmp/tpenv/bin/python benchmarks/bench_torch_pruning.py [--whole default|small]
        [--windows 16384 --epochs 4 --calib-batch 128 --macro 1024 --ratio 0.1 --val-windows 4096]

Units: Torch-Pruning prunes the out channels of every Linear it is allowed to (q / k / v head dims
with their coupled o input channels, FFN channels with their down-projection inputs); the output
Linears of attention and FFN (o, wo) and the patch embeddings / heads are ignored layers, so the
residual stream keeps its width, as in tsprune's default. Its per-step ratio follows the same
schedule (``ratio`` per epoch, spread over the epoch's macro-steps, as a global ratio of the
prunable channels). The units it picks are not comparable one to one with tsprune's masks (its
importance is per group of coupled weight channels; tsprune's is the mask gradient), so masks are
not compared: the row reports wall time, windows/s, what it pruned, and whether the pruned model
still runs. Writes ``benchmarks/results/torch_pruning_<model>.json``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from _common import write  # noqa: E402
from bench_compact import CLI_SCHEDULE  # noqa: E402
from bench_pipeline import BOLT_SMALL  # noqa: E402


def main(argv=None):
    import torch_pruning as tp

    from tsprune.adapters import get_adapter
    from tsprune.data import batch_indices, make_task
    from tsprune.models import load_model
    from tsprune.pretrain import build_model
    from tsprune.train import mean_loss

    c = CLI_SCHEDULE
    p = argparse.ArgumentParser()
    p.add_argument("--whole", default="default", choices=["default", "small"])
    p.add_argument("--windows", type=int, default=c["windows"])
    p.add_argument("--epochs", type=int, default=c["epochs"])
    p.add_argument("--calib-batch", type=int, default=c["batch"])
    p.add_argument("--macro", type=int, default=c["macro"])
    p.add_argument("--ratio", type=float, default=c["ratio"])
    p.add_argument("--val-windows", type=int, default=c["val_windows"])
    a = p.parse_args(argv)

    model = load_model("default") if a.whole == "default" else build_model(BOLT_SMALL, seed=0)
    adapter = get_adapter(model)
    task = make_task("ETTh1", lookback=model.config.chronos_config["context_length"], horizon=96,
                     max_train_windows=a.windows, max_eval_windows=a.val_windows)
    train, val = task.train, task.val
    model.eval()
    for q in model.parameters():
        q.requires_grad_(True)  # GroupTaylorImportance reads weight gradients
    n0 = sum(q.numel() for q in model.parameters())
    shapes0 = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    # ignored: everything that writes the residual stream or is not a transformer Linear
    ignored = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            last = name.rsplit(".", 1)[-1]
            if last in ("o", "wo") or "patch_embedding" in name or "output" in name or "embed" in name:
                ignored.append(mod)
        elif isinstance(mod, torch.nn.Embedding):
            ignored.append(mod)
    steps_per_epoch = max(1, math.ceil(len(train) / a.macro))
    total_steps = steps_per_epoch * a.epochs
    final_ratio = 1.0 - (1.0 - a.ratio / steps_per_epoch) ** total_steps
    ctx0, _ = train.batch(list(range(2)))
    t_build = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, ctx0, importance=tp.importance.GroupTaylorImportance(), global_pruning=True,
        pruning_ratio=final_ratio, iterative_steps=total_steps, ignored_layers=ignored,
        forward_fn=lambda m, x: m(context=x), output_transform=lambda out: out.quantile_preds)
    t_build = time.perf_counter() - t_build

    out = {"model": a.whole, "params_before": n0, "train_windows": len(train), "val_windows": len(val),
           "epochs": a.epochs, "batch": a.calib_batch, "macro": a.macro, "ratio": a.ratio,
           "tp_version": tp.__version__, "dependency_graph_s": t_build, "macro_steps_done": 0,
           "windows_done": 0, "error": None}
    t0, c0 = time.perf_counter(), time.process_time()
    step_times, prune_times = [], []
    try:
        with torch.no_grad():
            mean_loss(model, adapter, val, 1024)
        for ep in range(1, a.epochs + 1):
            seen = 0
            ts = time.perf_counter()
            for idx in batch_indices(len(train), a.calib_batch, shuffle=True, seed=ep):
                ctx, tgt = train.batch(idx)
                adapter.loss(model, ctx, tgt).backward()
                seen += len(idx)
                out["windows_done"] += len(idx)
                if seen >= a.macro:
                    step_times.append(time.perf_counter() - ts)
                    tp_ = time.perf_counter()
                    pruner.step()
                    prune_times.append(time.perf_counter() - tp_)
                    model.zero_grad(set_to_none=True)
                    out["macro_steps_done"] += 1
                    seen, ts = 0, time.perf_counter()
            if seen:
                tp_ = time.perf_counter()
                pruner.step()
                prune_times.append(time.perf_counter() - tp_)
                model.zero_grad(set_to_none=True)
                out["macro_steps_done"] += 1
            with torch.no_grad():
                mean_loss(model, adapter, val, 1024)
    except Exception as e:  # the pruned model may not run: record where and why
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        out["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - c0
    out["windows_per_s"] = out["windows_done"] / out["wall_s"]
    out["params_after"] = sum(q.numel() for q in model.parameters())
    out["macro_batch_fwd_bwd_s"] = step_times
    # what it pruned, per Linear kind: (out, in) features kept / before, summed over layers
    kinds = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n in shapes0:
            k = n.rsplit(".", 1)[-1]
            row = kinds.setdefault(k, [0, 0, 0, 0])
            for i, (now, was) in enumerate(zip(m.weight.shape, shapes0[n])):
                row[2 * i] += now
                row[2 * i + 1] += was
    out["kept_features"] = {k: {"out": f"{v[0]}/{v[1]}", "in": f"{v[2]}/{v[3]}"} for k, v in kinds.items()}
    out["pruner_step_s"] = prune_times
    print(f"Torch-Pruning {tp.__version__} ({a.whole} model): dependency graph {t_build:.2f} s; "
          f"{out['macro_steps_done']} macro steps, {out['windows_done']} windows in {out['wall_s']:.1f} s "
          f"({out['windows_per_s']:.1f} windows/s; CPU {out['cpu_s']:.1f} s); params {n0:,} -> "
          f"{out['params_after']:,}; median pruner.step() "
          f"{sorted(prune_times)[len(prune_times) // 2] * 1e3 if prune_times else float('nan'):.1f} ms; "
          f"error: {out['error']}")
    print("  features kept per Linear kind (out, in):", out["kept_features"])
    print("wrote", write(f"torch_pruning_{a.whole}", out))


if __name__ == "__main__":
    main()
