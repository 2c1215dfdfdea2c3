"""Fine-tune sweep that chooses the CLI's fine-tune defaults (issue 9 item 3): lr x step budget x
seed on one model and task, warm-up + cosine schedule, selection on validation MSE.

Each run fine-tunes a fresh copy of the model (``tsprune.train.finetune``), checking the
validation MSE every ``--eval-every`` steps on the first ``--max-val-windows`` (evenly spaced)
validation windows and keeping the best weights; the kept model is then scored on the FULL
validation and test sets. Defaults are to be read off the validation column (never the test one).

    python benchmarks/sweep_finetune.py --model default --data ETTh1 --horizon 96 \
        --lrs 3e-4,1e-3,3e-3 --steps 400,1200 --seeds 1

Writes benchmarks/results/sweep_finetune.json (every run, the machine) and sweep_finetune.md
(the table). The file is rewritten after every run, so an interrupted sweep keeps what it did.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from _common import RESULTS, machine, write  # noqa: E402

from tsprune.adapters import get_adapter  # noqa: E402
from tsprune.data import make_task  # noqa: E402
from tsprune.models import load_model, n_params  # noqa: E402
from tsprune.train import evaluate, finetune  # noqa: E402


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def table(runs: list[dict], zero: dict, base: dict) -> str:
    rows = ["| lr | steps | seeds | kept step | val MSE (full) | test MSE | test MAE | s / run |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| zero-shot | 0 | - | - | {zero['val_mse']:.4f} | {zero['mse']:.4f} | {zero['mae']:.4f} | - |"]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["lr"], r["steps"]), []).append(r)

    def ms(v):
        return f"{statistics.mean(v):.4f}" + (f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else "")

    best = min(groups, key=lambda k: statistics.mean(r["val_mse"] for r in groups[k])) if groups else None
    for (lr, steps), rs in groups.items():
        mark = " **(best val)**" if (lr, steps) == best else ""
        rows.append(f"| {lr:g}{mark} | {steps} | {len(rs)} | {', '.join(str(r['kept_step']) for r in rs)} | "
                    f"{ms([r['val_mse'] for r in rs])} | {ms([r['mse'] for r in rs])} | "
                    f"{ms([r['mae'] for r in rs])} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    rows.append(f"| linear baseline | - | - | - | - | {base['linear']['mse']:.4f} | {base['linear']['mae']:.4f} | - |")
    rows.append(f"| seasonal naive | - | - | - | - | {base['seasonal_naive']['mse']:.4f} | "
                f"{base['seasonal_naive']['mae']:.4f} | - |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="ETTh1")
    ap.add_argument("--horizon", type=int, default=96)
    ap.add_argument("--lookback", type=int, default=512)
    ap.add_argument("--lrs", type=_floats, default=_floats("3e-4,1e-3,3e-3"))
    ap.add_argument("--steps", type=_ints, default=_ints("400,1200"), help="optimiser-step budgets")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--eval-batch-size", type=int, default=1024)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of the budget")
    ap.add_argument("--schedule", default="cosine", choices=["constant", "cosine"])
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--patience", type=int, default=0, help="0: run the whole budget, keep the best check")
    ap.add_argument("--max-train-windows", type=int, default=None)
    ap.add_argument("--max-val-windows", type=int, default=4096, help="windows of the in-training checks")
    ap.add_argument("--amp", default=None, choices=["bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="sweep_finetune")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    base_model = load_model(a.model)
    adapter = get_adapter(base_model)
    task = make_task(a.data, a.lookback, a.horizon, max_train_windows=a.max_train_windows)
    val_check = task.val.capped(a.max_val_windows)
    print(task.describe(), flush=True)
    from tsprune.baselines import run_baselines

    base = run_baselines(task)
    z = evaluate(base_model, adapter, task.test, a.eval_batch_size, amp=a.amp)
    zero = {"mse": z["mse"], "mae": z["mae"],
            "val_mse": evaluate(base_model, adapter, task.val, a.eval_batch_size, amp=a.amp)["mse"]}
    print(f"zero-shot: test MSE {zero['mse']:.4f}, val MSE {zero['val_mse']:.4f}; linear {base['linear']['mse']:.4f}, "
          f"seasonal naive {base['seasonal_naive']['mse']:.4f}", flush=True)
    runs: list[dict] = []
    cfg = {k: v for k, v in vars(a).items()}
    for steps in a.steps:
        for lr in a.lrs:
            for seed in range(a.seeds):
                m = copy.deepcopy(base_model)
                t = time.time()
                h = finetune(m, adapter, task.train, val_check, steps=steps, lr=lr, batch_size=a.batch_size,
                             warmup=a.warmup, schedule=a.schedule, eval_every=a.eval_every, select="mse",
                             patience=a.patience, seed=seed, amp=a.amp, eval_batch_size=a.eval_batch_size)
                ft_s = time.time() - t
                te = evaluate(m, adapter, task.test, a.eval_batch_size, amp=a.amp)
                va = evaluate(m, adapter, task.val, a.eval_batch_size, amp=a.amp)
                r = {"lr": lr, "steps": steps, "seed": seed, "kept_step": h["kept_step"], "val_mse": va["mse"],
                     "val_check_mse": h["kept_val"], "mse": te["mse"], "mae": te["mae"],
                     "seconds": round(ft_s, 1), "checks": [(c["step"], round(c["val"], 5)) for c in h["history"]]}
                runs.append(r)
                print(f"lr {lr:g} steps {steps} seed {seed}: kept step {r['kept_step']}, val MSE {va['mse']:.4f}, "
                      f"test MSE {te['mse']:.4f} ({ft_s:.0f} s fine-tune)", flush=True)
                payload = {"config": cfg, "model_params": n_params(base_model), "task": task.summary(),
                           "zero_shot": zero, "baselines": base, "runs": runs}
                write(a.name, payload)
                md = (f"# Fine-tune sweep: {a.model} ({n_params(base_model):,} params) on {task.name}, horizon "
                      f"{a.horizon}, lookback {a.lookback}\n\n"
                      f"batch {a.batch_size}, AdamW, warm-up {a.warmup:g} of the budget + {a.schedule}, "
                      f"validation MSE every {a.eval_every} steps on {len(val_check):,} of {task.val.n_available:,} "
                      f"val windows (best kept), then full val ({len(task.val):,}) and test ({len(task.test):,} "
                      f"windows). Machine: {machine()['cpu']}, {machine()['torch_threads']} threads, "
                      f"{machine()['date']}.\n\n{table(runs, zero, base)}\n")
                (RESULTS / f"{a.name}.md").write_text(md)
    print(table(runs, zero, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
