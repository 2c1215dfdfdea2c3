"""Issue 13: what each kind of structured unit buys at inference. Parameters, Linear FLOPs and CPU
latency of the repacked model at four levels of pruning, against the unpruned model:

(a) inner units only: attention head dims and FFN channels (the masks ``Pruner(model)`` creates),
    a random 50% of the entries of every inner mask (``*.in`` / ``*.out``) zeroed;
(b) (a) + residual width (``residual=True``): 25% of the shared ``masks["residual"]`` zeroed;
(c) (a) + sub-blocks (``layers=True``): every third ``<sub-block>.gate`` mask zeroed;
(d) all together.

Masks are written by hand (deterministic, seeded torch.Generator; every level has the same inner
pattern), then ``small = pruner.repack()``. Model: Chronos-Bolt-small's shape (d_model 512, 8 heads
x 64, d_ff 2048, 6 + 6 layers, ReLU, context 512, prediction length 64, patches of 16, 9 quantiles),
random init, eval, fp32; ``--small``: a tiny shape for a quick check (d_model 64, 4 heads x 16,
d_ff 256, 2 + 2 layers).

Per model: parameters; d_model kept; sub-blocks removed; FLOPs of one forward at batch 32 counted
as 2 * rows * in * out over every Linear-like module (a module with in_features / out_features;
tsprune's ZeroLinear, which holds no weight, counts 0; attention score / value matmuls, norms and
activations are not counted); latency of ``model(context=ctx)`` under torch.inference_mode at
``--threads`` torch threads (default 1), median of ``--runs`` runs after 3 warm-up runs, all models
interleaved round-robin (benchmarks/_common.bench). Each repacked model's quantile_preds are
compared with the masked model's (masks attached): the run fails if the max abs difference exceeds
1e-4 * max(1, max |ref|).

    OMP_NUM_THREADS=1 python benchmarks/bench_units.py [--small] [--threads 1] [--runs 15]
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from _common import RESULTS, bench, machine, write  # noqa: E402

import tsprune  # noqa: E402

QUANTILES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
SHAPES = {
    "chronos-bolt-small": dict(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6, num_decoder_layers=6),
    "small": dict(d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2),
}
CHRONOS = dict(context_length=512, prediction_length=64, input_patch_size=16, input_patch_stride=16,
               quantiles=QUANTILES, use_reg_token=True)
LEVELS = {  # name -> (residual, layers)
    "a_inner": (False, False),
    "b_inner_residual": (True, False),
    "c_inner_subblocks": (False, True),
    "d_all": (True, True),
}
LABELS = {
    "full": "unpruned",
    "a_inner": "(a) inner (50% of head dims / FFN channels)",
    "b_inner_residual": "(b) inner + residual (25% of d_model)",
    "c_inner_subblocks": "(c) inner + sub-blocks (1/3 gated off)",
    "d_all": "(d) all together",
}
INNER_FRAC, RESIDUAL_FRAC, GATE_EVERY = 0.5, 0.25, 3


def build(shape: str, seed: int = 0) -> torch.nn.Module:
    from chronos.chronos_bolt import ChronosBoltModelForForecasting
    from transformers import T5Config

    torch.manual_seed(seed)
    cfg = T5Config(**SHAPES[shape], feed_forward_proj="relu", vocab_size=2, decoder_start_token_id=0,
                   pad_token_id=0, chronos_config=dict(CHRONOS))
    m = ChronosBoltModelForForecasting(cfg).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def linear_flops(m: torch.nn.Module, ctx: torch.Tensor) -> int:
    """2 * rows * in * out summed over every Linear-like module in one forward (0 for a module
    without a weight, i.e. tsprune's ZeroLinear)."""
    total = [0]

    def hook(mod, inp, out):
        if getattr(mod, "weight", None) is None:
            return
        x = inp[0]
        k = mod.in_features
        rows = x.numel() // k if k else 0
        total[0] += 2 * rows * k * mod.out_features

    hs = [mod.register_forward_hook(hook) for mod in m.modules()
          if hasattr(mod, "in_features") and hasattr(mod, "out_features")]
    try:
        with torch.inference_mode():
            m(context=ctx)
    finally:
        for h in hs:
            h.remove()
    return total[0]


def d_model_kept(m: torch.nn.Module) -> int:
    return m.encoder.final_layer_norm.weight.numel()


def inner_pattern(base: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """0/1 values of every inner mask (name ending in .in / .out): a random INNER_FRAC of each zeroed."""
    p = tsprune.Pruner(base)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in p.masks.items():
        if not (name.endswith(".in") or name.endswith(".out")):
            continue
        v = torch.ones(m.numel())
        v[torch.randperm(m.numel(), generator=g)[: int(round(INNER_FRAC * m.numel()))]] = 0
        out[name] = v
    return out


def set_masks(p: tsprune.Pruner, inner: dict[str, torch.Tensor], seed: int = 1) -> dict:
    """Write the level's 0/1 values into p.masks: the inner pattern; 25% of "residual" (seeded);
    every third gate. Returns what was zeroed."""
    info = {"residual_zeroed": 0, "gates_zeroed": []}
    with torch.no_grad():
        inner_names = [n for n in p.masks if n.endswith(".in") or n.endswith(".out")]
        if sorted(inner_names) != sorted(inner):
            raise RuntimeError("inner masks differ between levels: "
                               f"{sorted(set(inner_names) ^ set(inner))[:5]}")
        for n in inner_names:
            p.masks[n].copy_(inner[n])
        if "residual" in p.masks:
            r = p.masks["residual"]
            g = torch.Generator().manual_seed(seed)
            k = int(round(RESIDUAL_FRAC * r.numel()))
            r.fill_(1.0)
            r[torch.randperm(r.numel(), generator=g)[:k]] = 0
            info["residual_zeroed"] = k
        gates = [n for n in p.masks if n.endswith(".gate")]
        for i, n in enumerate(gates):
            off = i % GATE_EVERY == GATE_EVERY - 1
            p.masks[n].fill_(0.0 if off else 1.0)
            if off:
                info["gates_zeroed"].append(n)
        info["gates"] = len(gates)
        known = set(inner_names) | {"residual"} | set(gates)
        other = [n for n in p.masks if n not in known]
        if other:
            raise RuntimeError(f"unexpected masks: {other[:5]}")
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shape (d_model 64, 2 + 2 layers) for a quick check")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    shape = "small" if a.small else "chronos-bolt-small"
    load0 = os.getloadavg()

    base = build(shape)
    L = CHRONOS["context_length"]
    ctx = torch.randn(a.batch, L, generator=torch.Generator().manual_seed(0))
    inner = inner_pattern(base)

    models = {"full": base}
    rows = {"full": {"params": n_params(base), "d_model": d_model_kept(base), "subblocks_removed": 0,
                     "flops": linear_flops(base, ctx)}}
    for lvl, (residual, layers) in LEVELS.items():
        work = copy.deepcopy(base)
        p = tsprune.Pruner(work, residual=residual, layers=layers)
        info = set_masks(p, inner)
        small = p.repack().eval()
        for prm in small.parameters():
            prm.requires_grad_(False)
        p.attach()
        with torch.no_grad():
            ref = work(context=ctx).quantile_preds
            got = small(context=ctx).quantile_preds
        p.detach()
        diff = (ref - got).abs().max().item()
        scale = ref.abs().max().item()
        tol = 1e-4 * max(1.0, scale)
        print(f"{lvl}: repacked vs masked quantile_preds max |diff| = {diff:.3g} (max |ref| {scale:.3g}, "
              f"tolerance {tol:.3g})", flush=True)
        if not diff <= tol:
            raise AssertionError(f"{lvl}: repacked model differs from the masked model: max |diff| {diff:.3g} > {tol:.3g}")
        gates = getattr(small, "tsprune_plan", None)
        gates = gates.extra.get("gates", {}) if gates is not None else {}
        rows[lvl] = {"params": n_params(small), "d_model": d_model_kept(small),
                     "subblocks_removed": sum(1 for v in gates.values() if v == 0),
                     "flops": linear_flops(small, ctx), "max_abs_diff": diff, "ref_max_abs": scale,
                     "residual_zeroed": info["residual_zeroed"], "gates_total": info["gates"],
                     "gates_zeroed": info["gates_zeroed"]}
        models[lvl] = small
        del work, p

    def fwd(m):
        def f():
            with torch.inference_mode():
                m(context=ctx)
        return f

    t = bench({k: fwd(m) for k, m in models.items()}, warmup=a.warmup, reps=a.runs)
    load1 = os.getloadavg()
    full = rows["full"]
    for k, r in rows.items():
        r["median_ms"] = t[k]["median_ms"]
        r["min_ms"] = t[k]["min_ms"]
        r["params_ratio"] = r["params"] / full["params"]
        r["flops_ratio"] = r["flops"] / full["flops"]
        r["speedup"] = t["full"]["median_ms"] / t[k]["median_ms"]
        r["flop_speedup"] = full["flops"] / r["flops"] if r["flops"] else float("inf")

    mach = machine()
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "python"], capture_output=True, text=True,
                               cwd=RESULTS.parent).stdout.split("\n")
        dirty = [ln[3:] for ln in dirty if ln.strip()]
    except OSError:
        dirty = []
    cmd = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset") + " python benchmarks/bench_units.py " + \
        " ".join(sys.argv[1:] if argv is None else argv)
    hdr = ("| model | params | params / full | d_model | sub-blocks removed | Linear GFLOPs / forward | "
           "FLOPs / full | ms (median) | ms (min) | speed-up | FLOP speed-up (full / level) | max abs diff vs masked |")
    lines = [hdr, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, r in rows.items():
        d = "-" if k == "full" else f"{r['max_abs_diff']:.2g}"
        lines.append(f"| {LABELS[k]} | {r['params']:,} | {r['params_ratio']:.3f} | {r['d_model']} | "
                     f"{r['subblocks_removed']} | {r['flops'] / 1e9:.3f} | {r['flops_ratio']:.3f} | "
                     f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['speedup']:.2f}x | {r['flop_speedup']:.2f}x | {d} |")
    table = "\n".join(lines)
    n_sub = rows["c_inner_subblocks"]["gates_total"]
    notes = [
        f"# Units benchmark (issue 13): `{cmd.strip()}`",
        "",
        f"{mach['date']}, commit {mach.get('commit', '?')}"
        + (f" (working tree with uncommitted changes in: {', '.join(dirty)})" if dirty else "")
        + f", torch {mach['torch']}, Python {mach['python']}, {mach['cpu']}, {mach['cores']} cores, "
        f"{torch.get_num_threads()} torch thread(s), load average {load0[0]:.2f} at start / {load1[0]:.2f} at end.",
        "",
        f"Model: Chronos-Bolt ({shape} shape: {SHAPES[shape]}, ReLU, context {L}, prediction length "
        f"{CHRONOS['prediction_length']}, patches of 16, 9 quantiles, reg token), random init, eval, fp32. "
        f"Batch {a.batch} x context {L}; latency = median of {a.runs} runs of `model(context=ctx)` under "
        f"torch.inference_mode after {a.warmup} warm-up runs, models interleaved round-robin. FLOPs: "
        "2 * rows * in * out over every Linear (ZeroLinear 0), one forward; attention matmuls, norms, "
        "activations not counted.",
        "",
        f"Masks written by hand, then `Pruner.repack()`: inner = a random {INNER_FRAC:.0%} of the entries of "
        f"every head-dim / FFN-channel mask (same pattern in every level); residual = {RESIDUAL_FRAC:.0%} of "
        f"the shared residual mask; sub-blocks = every third of the {n_sub} gates. Every repacked model's "
        "quantile_preds equal the masked model's within the last column.",
        "",
        table,
        "",
    ]
    md = "\n".join(notes)
    print(md)
    name = "units" + ("_small" if a.small else "")
    res = {"command": cmd.strip(), "shape": shape, "config": SHAPES[shape], "chronos_config": CHRONOS,
           "batch": a.batch, "threads": torch.get_num_threads(), "runs": a.runs, "warmup": a.warmup,
           "loadavg_start": load0, "loadavg_end": load1, "dirty_files": dirty,
           "inner_frac": INNER_FRAC, "residual_frac": RESIDUAL_FRAC, "gate_every": GATE_EVERY, "rows": rows,
           "timing": t}
    path = write(name, res)
    (RESULTS / f"{name}.md").write_text(md)
    print("wrote", path, "and", RESULTS / f"{name}.md")


if __name__ == "__main__":
    main()
