"""Reports of a pruning run: the per-layer sparsity heatmap and the results table.

Stage of the flow: end of the line; reads the Pruner's per-mask sparsity and the metrics dicts.
"""
from __future__ import annotations

import os
import pathlib

from .adapters.base import Site


def sparsity_grid(sites: list[Site], sparsity: dict[str, float]) -> tuple[list[str], list[str], list[list[float]]]:
    """(layers, columns, values): rows = layers in model order, columns = '<kind>.<side>' in order
    of first appearance; NaN where a layer has no such mask."""
    layers: list[str] = []
    cols: list[str] = []
    cell: dict[tuple[str, str], float] = {}
    for s in sites:
        if s.layer not in layers:
            layers.append(s.layer)
        for side, spec in (("in", s.mask_in), ("out", s.mask_out)):
            if spec is None:
                continue
            c = f"{s.kind}.{side}"
            if c not in cols:
                cols.append(c)
            cell[(s.layer, c)] = sparsity.get(s.mask_name(side), float("nan"))
    grid = [[cell.get((l, c), float("nan")) for c in cols] for l in layers]
    return layers, cols, grid


def sparsity_heatmap(sites: list[Site], sparsity: dict[str, float], path, title: str = "") -> pathlib.Path:
    """Write a PNG heatmap of the fraction of units pruned per layer (rows) and module type (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, cols, grid = sparsity_grid(sites, sparsity)
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def results_table(results: dict) -> str:
    """Markdown table of {setting: {mse, mae, params, ...}}."""
    rows = ["| setting | MSE | MAE | params | vs fine-tune (MSE) |", "| --- | ---: | ---: | ---: | ---: |"]
    ft = results.get("finetune", {}).get("mse")
    for name, r in results.items():
        if not isinstance(r, dict) or "mse" not in r:
            continue
        rel = f"{(r['mse'] / ft - 1) * 100:+.1f}%" if ft else ""
        rows.append(f"| {name} | {r['mse']:.4f} | {r['mae']:.4f} | {r['params']:,} | {rel} |")
    return "\n".join(rows)
