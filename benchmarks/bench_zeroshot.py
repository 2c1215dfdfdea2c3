"""Issue 10: compare pre-trained models zero-shot, side by side, before one is embedded.

For each model directory (or ``default``): ``tsprune.pretrain.seasonal_probe`` (clean sines and
daily dips at periods 12 / 24 / 48 / 168; 0 exact, 1 a flat line), the MSE on 2,048 evenly spaced
ETTh2 h96 VALIDATION windows (what a pre-training run may be judged on; ETTh1 is never read by
pre-training), and the zero-shot test MSE on every window of the standard test split of ETTh1,
ETTh2, exchange_rate (h96, lookback 512) and national_illness (h24, lookback 104), with seasonal
naive beside them. Writes ``benchmarks/results/<name>.json`` and ``.md``.

    PYTHONPATH=python:. python benchmarks/bench_zeroshot.py MODEL [MODEL ...] [--name zeroshot] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, write  # noqa: E402

CELLS = (("ETTh1", 96, 512), ("ETTh2", 96, 512), ("exchange_rate", 96, 512), ("national_illness", 24, 104))
VAL_WINDOWS = 2048


def _val_mse(model, adapter, task) -> float:
    """Median-forecast MSE over the task's (capped, evenly spaced) validation windows (float64 sums)."""
    from tsprune.train import evaluate

    ds = task.val
    return float(evaluate(model, adapter, ds, 256, warmup=False)["mse"])


def measure(path: str) -> dict:
    from tsprune.adapters import get_adapter
    from tsprune.baselines import _score, seasonal_naive, seasonal_period
    from tsprune.data import make_task
    from tsprune.models import load_model, n_params
    from tsprune.pretrain import seasonal_probe
    from tsprune.train import evaluate

    model = load_model(path).float().eval()
    ad = get_adapter(model)
    row = {"model": path, "params": n_params(model), "probe": seasonal_probe(model)}
    row["etth2_val_mse"] = _val_mse(model, ad, make_task("ETTh2", 512, 96, max_eval_windows=VAL_WINDOWS))
    row["test"] = {}
    for d, h, lb in CELLS:
        task = make_task(d, lb, h)
        r = evaluate(model, ad, task.test, 256)
        period = seasonal_period(task.meta.get("freq"))
        sn = _score(lambda c: seasonal_naive(c, h, period), task.test, 4096)
        row["test"][f"{d}_h{h}"] = {"mse": r["mse"], "mae": r["mae"], "windows": r["windows"],
                                    "seasonal_naive_mse": sn["mse"]}
        print(f"{path}: {d} h{h} zero-shot test MSE {r['mse']:.4f} ({r['windows']:,} windows)", flush=True)
    return row


def markdown(rows: list[dict], m: dict) -> str:
    keys = [f"{d}_h{h}" for d, h, _ in CELLS]
    lines = [f"# Zero-shot comparison ({m.get('cpu')}, {m.get('date')}, commit {m.get('commit')})", "",
             "| model | params | probe p12 | p24 | p48 | p168 | probe mean | ETTh2 h96 val MSE | "
             + " | ".join(k.replace("_h", " h") for k in keys) + " |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for r in rows:
        p = r["probe"]
        lines.append(f"| {r['model']} | {r['params']:,} | {p['p12']:.3f} | {p['p24']:.3f} | {p['p48']:.3f} | "
                     f"{p['p168']:.3f} | {p['mean']:.3f} | {r['etth2_val_mse']:.4f} | "
                     + " | ".join(f"{r['test'][k]['mse']:.4f}" for k in keys) + " |")
    sn = rows[0]["test"]
    lines.append("| seasonal naive | 0 | | | | | | | " + " | ".join(f"{sn[k]['seasonal_naive_mse']:.4f}" for k in keys)
                 + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model directories, or 'default'")
    p.add_argument("--name", default="zeroshot")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    torch.manual_seed(0)
    np.random.seed(0)
    rows = [measure(m) for m in a.models]
    m = machine()
    path = write(a.name, {"rows": rows, "val_windows": VAL_WINDOWS})
    md = markdown(rows, m)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(md)
    os.replace(tmp, path.with_suffix(".md"))
    print(md)


if __name__ == "__main__":
    main()
