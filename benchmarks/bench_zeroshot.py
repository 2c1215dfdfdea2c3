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
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, write  # noqa: E402
from tsprune.atomic import atomic_write  # noqa: E402

CELLS = (("ETTh1", 96, 512), ("ETTh2", 96, 512), ("exchange_rate", 96, 512), ("national_illness", 24, 104))
VAL_WINDOWS = 2048


def measure(path: str) -> dict:
    from tsprune.adapters import get_adapter
    from tsprune.baselines import seasonal_naive_metrics
    from tsprune.data import make_task
    from tsprune.models import load_model, n_params
    from tsprune.pretrain import seasonal_probe
    from tsprune.train import evaluate

    model = load_model(path).float().eval()
    ad = get_adapter(model)
    row = {"model": path, "params": n_params(model), "probe": seasonal_probe(model)}
    val = make_task("ETTh2", 512, 96, max_eval_windows=VAL_WINDOWS).val  # evenly spaced windows
    row["etth2_val_mse"] = evaluate(model, ad, val, 256, warmup=False)["mse"]
    row["test"] = {}
    for d, h, lb in CELLS:
        task = make_task(d, lb, h)
        r = evaluate(model, ad, task.test, 256)
        row["test"][f"{d}_h{h}"] = {"mse": r["mse"], "mae": r["mae"], "windows": r["windows"],
                                    "seasonal_naive_mse": seasonal_naive_metrics(task)["mse"]}
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
    rows = [measure(m) for m in a.models]  # every step is deterministic: no seed to set
    path = write(a.name, {"rows": rows, "val_windows": VAL_WINDOWS})
    md = markdown(rows, machine())
    atomic_write(path.with_suffix(".md"), lambda f: f.write(md.encode()))
    print(md)


if __name__ == "__main__":
    main()
