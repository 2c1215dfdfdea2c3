"""Reports of a pruning run: the per-layer sparsity heatmap and the results table.

Stage of the flow: end of the line; reads the Pruner's per-mask sparsity and the metrics dicts.
"""
from __future__ import annotations

import pathlib

from .adapters.base import Site


def sparsity_grid(sites: list[Site], sparsity: dict[str, float], points=()) -> tuple[list[str], list[str], list[list[float]]]:
    """(layers, columns, values): rows = layers in model order, columns = '<kind>.<side>' in order
    of first appearance; NaN where a layer has no such mask. With ``points`` (Pruner.points): a
    '<kind>.gate' column per sub-block kind (1 = the sub-block was removed) and a 'residual' row
    whose 'residual' cell is the fraction of the stream width removed; the shared residual mask is
    not repeated in the per-Linear columns."""
    layers: list[str] = []
    cols: list[str] = []
    cell: dict[tuple[str, str], float] = {}
    for s in sites:
        if s.layer not in layers:
            layers.append(s.layer)
        for side, spec in (("in", s.mask_in), ("out", s.mask_out)):
            if spec is None or s.mask_name(side) == "residual":
                continue
            c = f"{s.kind}.{side}"
            if c not in cols:
                cols.append(c)
            cell[(s.layer, c)] = sparsity.get(s.mask_name(side), float("nan"))
    for pt in points:
        if pt.layer not in layers:
            layers.append(pt.layer)
        if pt.kind not in cols:
            cols.append(pt.kind)
        cell[(pt.layer, pt.kind)] = sparsity.get(pt.name, float("nan"))
    layers = [l for l in layers if any((l, c) in cell for c in cols)]
    grid = [[cell.get((l, c), float("nan")) for c in cols] for l in layers]
    return layers, cols, grid


def sparsity_heatmap(sites: list[Site], sparsity: dict[str, float], path, title: str = "", points=()) -> pathlib.Path:
    """Write a PNG heatmap of the fraction of units pruned per layer (rows) and module type (columns);
    with ``points``, the sub-block gates and the residual width too (see sparsity_grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, cols, grid = sparsity_grid(sites, sparsity, points)
    data = np.array(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(cols) + 2), max(3, 0.4 * len(layers) + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    for i in range(len(layers)):
        for j in range(len(cols)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.0%}", ha="center", va="center", fontsize=6,
                        color="white" if data[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="fraction of units pruned")
    ax.set_title(title or "sparsity per layer and module")
    fig.tight_layout()
    path = pathlib.Path(path)
    from .checkpoint import atomic_write

    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


ROW_NAMES = {"zero_shot": "zero-shot", "finetune": "fine-tune", "prune_finetune": "prune-then-finetune",
             "seasonal_naive": "seasonal naive", "linear": "linear (ridge)"}


def result_rows(results: dict) -> list[tuple[str, dict]]:
    """(display name, row) of every setting and baseline in ``results`` (results.json layout)."""
    rows = [(ROW_NAMES.get(k, k), r) for k, r in results.items()
            if k != "baselines" and isinstance(r, dict) and "mse" in r]
    for k, r in (results.get("baselines") or {}).items():
        rows.append((ROW_NAMES.get(k, k), r))
    return rows


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def results_table(results: dict) -> str:
    """Markdown table of the settings and baselines: test MSE (± std over seeds), MAE, parameters,
    % of parameters removed (vs zero-shot), % of units pruned, test windows evaluated / available,
    inference ms per window (``tsprune run``: the models timed side by side on one test batch),
    rank by MSE and which rows each one beats (lower MSE); then one line ordering all rows."""
    rows = result_rows(results)
    zp = (results.get("zero_shot") or {}).get("params")
    order = sorted(range(len(rows)), key=lambda i: rows[i][1]["mse"])
    rank = {i: r + 1 for r, i in enumerate(order)}
    out = ["| # | setting | MSE | MAE | params | params removed | units pruned | test windows | ms / window "
           "| beats (lower MSE than) |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for i, (name, r) in enumerate(rows):
        mse = f"{r['mse']:.4f}" + (f" ± {r['mse_std']:.4f}" if "mse_std" in r and r.get("seeds") else "")
        mae = f"{r['mae']:.4f}" + (f" ± {r['mae_std']:.4f}" if "mae_std" in r and r.get("seeds") else "")
        removed = r.get("params_removed_fraction")
        if removed is None and zp and r.get("params") is not None and name not in (
                ROW_NAMES["seasonal_naive"], ROW_NAMES["linear"]):
            removed = 1 - r["params"] / zp
        n, m = r.get("test_windows"), r.get("test_windows_available")
        win = "-" if n is None else (f"{n:,}" if n == m or m is None else f"{n:,} of {m:,}")
        ms = r.get("ms_per_window")
        beats = [rows[j][0] for j in order if rows[j][1]["mse"] > r["mse"]]
        out.append(f"| {rank[i]} | {name} | {mse} | {mae} | {r['params']:,} | {_pct(removed)} | "
                   f"{_pct(r.get('pruned_units_fraction'))} | {win} | {'-' if ms is None else f'{ms:.3f}'} | "
                   f"{', '.join(beats) if beats else '-'} |")
    out.append("")
    out.append("By test MSE (lower is better): " + " < ".join(
        f"{rows[i][0]} {rows[i][1]['mse']:.4f}" for i in order) + ".")
    return "\n".join(out)
