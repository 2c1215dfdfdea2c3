"""GPU benchmarks of tsprune_kernels (Triton kernels, CUDA repack). Run by benchmarks/gpu_suite.sh.

    python benchmarks/bench_gpu.py [--out DIR] [--quick]

1. Masked calibration step of one Linear (forward + backward to x and to both masks, frozen
   weight) at layer shapes of Chronos-Bolt-base (d_model 768, d_ff 3072, 12 heads; encoder
   context 2048 / patch 16 = 128 patches + 1 [REG] = 129 tokens per sample, batch 64) and
   TimesFM-1.0-200M (d_model 1280, FFN hidden 1280, 16 heads of 80; 64 patches of 32 per sample,
   batch 128), fp32 and bf16. Cases: unmasked (F.linear, the floor); plain autograd masks
   (F.linear(x * m_in, W, b) * m_out with mask parameters: what the reference code does); tsprune
   masked_linear with the gradients sent to arena accumulators, with and without the taylor2
   per-sample squares, with masks all ones and with half of the units pruned (0/1 masks), on its
   default path and on the other one (fused Triton GEMMs vs folded weight + cuBLAS).
   Time: triton.testing.do_bench median (warm-up, L2 flushed). Memory: peak allocated during one
   step above what exists before it (x, W, b, gy), and what the forward keeps for backward.
2. Arena step (score, EMA, global threshold, prune) over ~1000 masks / 500K units: ScoreArena.step
   (Triton radix select) vs a per-module Python loop with cat + topk (the reference code's way).
3. Repack of a Chronos-Bolt-base-like weight set (one call for all tensors): effective bandwidth
   (bytes read + written) vs a device copy of the same bytes, from the profiler's kernel times,
   and the end-to-end call time vs a per-tensor index_select loop.

Writes gpu_bench.json and gpu_bench.md under --out (default: $OUT, else benchmarks/results).
Targets (H100): masked step <= 1.10x unmasked and <= 0.6x the peak memory of autograd masks;
arena step >= 20x faster than the loop; repack >= 80% of copy bandwidth.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tsprune_kernels as K  # noqa: E402
from tsprune_kernels import _backend  # noqa: E402

DEV = "cuda"
SMOKE = False  # --smoke: run every code path on tiny CPU shapes (TRITON_INTERPRET=1), no timing value

MODELS = {
    # name: (d_model, d_ff, heads, tokens per sample, batch)
    "chronos-bolt-base": (768, 3072, 12, 129, 64),
    "timesfm-200m": (1280, 1280, 16, 64, 128),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _bench(fn, rep_ms=100):
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _mem(fn):
    """(peak bytes above the start, bytes held after fn returns) for one call."""
    if SMOKE:
        fn()
        return 1, 0
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    keep = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    held = torch.cuda.memory_allocated() - base
    del keep
    return peak, held


def masked_step(model: str, layer: str, k: int, n: int, dtype: torch.dtype, zero_frac: float, quick: bool):
    d_model, d_ff, heads, tps, batch = MODELS[model]
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, tps, k, device=dev, dtype=dtype, generator=g).requires_grad_(True)
    w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, device=dev, generator=g).to(dtype)
    gy = torch.randn(batch, tps, n, device=dev, generator=g).to(dtype)
    mi0 = (torch.rand(k, device=dev, generator=g) >= zero_frac).float()
    mo0 = (torch.rand(n, device=dev, generator=g) >= zero_frac).float()
    arena = K.ScoreArena([("in", k, 1), ("out", n, 1)], device=dev)
    arena.masks()["in"].copy_(mi0)
    arena.masks()["out"].copy_(mo0)
    mi_p = mi0.to(dtype).clone().requires_grad_(True)
    mo_p = mo0.to(dtype).clone().requires_grad_(True)

    def unmasked():
        x.grad = None
        y = F.linear(x, w, b)
        y.backward(gy)

    def autograd_masks():
        x.grad = mi_p.grad = mo_p.grad = None
        (F.linear(x * mi_p, w, b) * mo_p).backward(gy)

    def ours(sq: bool):
        def f():
            x.grad = None
            y = K.masked_linear(x, w, b, arena.mask_view("in"), arena.mask_view("out"),
                                grad_acc_in=arena.grad_view("in"), grad_acc_out=arena.grad_view("out"),
                                sq_acc_in=arena.sq_view("in") if sq else None,
                                sq_acc_out=arena.sq_view("out") if sq else None)
            y.backward(gy)
        return f

    def fwd_only(kind):
        def f():
            if kind == "unmasked":
                return F.linear(x, w, b)
            if kind == "autograd_masks":
                return F.linear(x * mi_p, w, b) * mo_p
            return K.masked_linear(x, w, b, arena.mask_view("in"), arena.mask_view("out"),
                                   grad_acc_in=arena.grad_view("in"), grad_acc_out=arena.grad_view("out"))
        return f

    cases = {"unmasked": unmasked, "autograd_masks": autograd_masks, "tsprune": ours(False),
             "tsprune_taylor2": ours(True)}
    from tsprune_kernels.triton import masked_linear as tml

    default_path = tml.path(dtype)
    other = "fused" if default_path == "fold" else "fold"
    out = {"model": model, "layer": layer, "K": k, "N": n, "T": batch * tps, "dtype": str(dtype).split(".")[-1],
           "zero_frac": zero_frac, "default_path": default_path, "cases": {}}
    for name, fn in cases.items():
        r = {"ms": _bench(fn)}
        r["peak_bytes"], _ = _mem(lambda: fn())
        if name in ("unmasked", "autograd_masks", "tsprune"):
            y_bytes = batch * tps * n * torch.tensor([], dtype=dtype).element_size()
            _, held = _mem(fwd_only(name))
            r["held_for_backward_bytes"] = held - y_bytes
        out["cases"][name] = r
    # The other path, for comparison: fold (cuBLAS) for bf16 everywhere; fused (Triton's fp32 dot,
    # FMA units) for fp32 on one shape only, since each shape costs autotuning compiles.
    if not quick and (dtype != torch.float32 or (model, layer) == ("chronos-bolt-base", "ffn.in")):
        os.environ["TSPRUNE_TRITON_MASKED_LINEAR"] = other
        try:
            out["cases"][f"tsprune_{other}_path"] = {"ms": _bench(ours(False))}
        finally:
            os.environ.pop("TSPRUNE_TRITON_MASKED_LINEAR", None)
    c = out["cases"]
    out["ratio_time_vs_unmasked"] = c["tsprune"]["ms"] / c["unmasked"]["ms"]
    out["ratio_time_taylor2_vs_unmasked"] = c["tsprune_taylor2"]["ms"] / c["unmasked"]["ms"]
    out["speedup_vs_autograd"] = c["autograd_masks"]["ms"] / c["tsprune"]["ms"]
    out["ratio_peak_vs_autograd"] = c["tsprune"]["peak_bytes"] / max(1, c["autograd_masks"]["peak_bytes"])
    # bytes and FLOPs of the step (frozen weight: forward GEMM + dx GEMM)
    es = torch.tensor([], dtype=dtype).element_size()
    T = batch * tps
    out["gflop"] = 2 * 2 * T * k * n / 1e9
    out["unmasked_mbytes"] = (2 * T * k + 2 * T * n + n * k * 2) * es / 1e6
    return out


def arena_step(n_masks: int, n_units: int, reps_ms: int = 300):
    dev = DEV
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(n_masks, generator=g) + 0.05
    sizes = [max(1, int(u)) for u in (raw / raw.sum() * n_units).tolist()]
    specs = [(f"m{i}", u, 1) for i, u in enumerate(sizes)]
    arena = K.ScoreArena(specs, device=dev)
    acc0 = torch.randn(2, arena.n_units, generator=g).to(dev)
    acc0[1].abs_()
    imp0 = torch.randn(arena.n_units, generator=g).to(dev)
    mask0 = (torch.rand(arena.n_units, generator=g) > 0.1).float().to(dev)
    ratio, ema = 0.02, 0.5

    def ours():
        arena.mask.copy_(mask0)
        arena.imp.copy_(imp0)
        arena.acc.copy_(acc0)
        arena.steps = 1
        return arena.step("taylor", ema=ema, ratio=ratio)

    # the reference code's way: one tensor per module, Python loop, cat + topk, syncs per module
    masks = [mask0[o:o + u].clone() for o, u in zip(arena.offsets.tolist(), sizes)]
    imps = [imp0[o:o + u].clone() for o, u in zip(arena.offsets.tolist(), sizes)]
    grads = [acc0[0, o:o + u].clone() for o, u in zip(arena.offsets.tolist(), sizes)]

    def loop():
        for i, o in enumerate(arena.offsets.tolist()[:-1]):
            masks[i].copy_(mask0[o:o + sizes[i]])
            imps[i].copy_(imp0[o:o + sizes[i]])
        live_scores = []
        for m, imp, gr in zip(masks, imps, grads):
            s = -gr * m
            imp.mul_(1 - ema).add_(s, alpha=ema).mul_(m != 0)
            live_scores.append(imp[m != 0].abs())  # boolean indexing: a host sync per module
        allv = torch.cat(live_scores)
        k = math.ceil(ratio * allv.numel())
        thr = float(torch.topk(allv, k, largest=False).values.max())
        pruned = 0
        for m, imp in zip(masks, imps):
            sel = (m != 0) & ((imp.abs() <= thr) | (imp == 0))
            pruned += int(sel.sum())
            m.masked_fill_(sel, 0)
            imp.masked_fill_(sel, 0)
        return pruned

    res = ours()
    n_loop = loop()
    out = {"masks": n_masks, "units": arena.n_units, "ratio": ratio,
           "pruned_arena": res.pruned, "pruned_loop": n_loop,
           "arena_backend": str(_backend.choose("prune_lowest_", dev))}
    out["arena_ms"] = _bench(ours, reps_ms)
    out["loop_ms"] = _bench(loop, reps_ms)
    prev = K.set_backend("torch")
    try:
        out["arena_torch_backend_ms"] = _bench(ours, reps_ms)
    finally:
        K.set_backend(prev)
    out["speedup_vs_loop"] = out["loop_ms"] / out["arena_ms"]
    return out


def _kernel_us(fn, name_part: str, iters: int = 10):
    """Mean device time (us) per call of the GPU activities (kernels, memcpys) whose name contains
    name_part, from the profiler's device-side events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA or name_part not in e.name:
            continue
        total += getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) or 0.0
    return total / iters


def repack_bench(dtype: torch.dtype, pattern: str):
    dev = DEV
    g = torch.Generator().manual_seed(0)
    d, ff = (128, 256) if SMOKE else (768, 3072)
    shapes = ([(d, d)] * 4 + [(ff, d), (d, ff), (d,)]) * 12 + ([(d, d)] * 8 + [(ff, d), (d, ff), (d,)] * 1) * 12
    ts = [torch.randn(s, generator=g).to(dtype).to(dev) for s in shapes]

    def keep(m):
        if pattern == "heads" and m % 64 == 0:  # kept runs of 64 (whole heads / channel groups)
            blocks = torch.randperm(m // 64, generator=g)[: max(1, m // 128)].sort().values
            return (blocks[:, None] * 64 + torch.arange(64)).reshape(-1).to(dev)
        return torch.randperm(m, generator=g)[: max(1, m // 2)].sort().values.to(dev)

    rows = [keep(t.shape[0]) for t in ts]
    cols = [keep(t.shape[1]) if t.dim() == 2 else None for t in ts]
    out_bytes = sum(r.numel() * (c.numel() if c is not None else 1) for r, c in zip(rows, cols)) * ts[0].element_size()
    src = torch.empty(out_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)

    def ours():
        return K.repack(ts, rows, cols)

    def loop():
        return [t.index_select(0, r) if c is None else t.index_select(0, r).index_select(1, c)
                for t, r, c in zip(ts, rows, cols)]

    def copy():
        dst.copy_(src)

    got = ours()
    assert all(torch.equal(a, b_) for a, b_ in zip(got, loop()))
    r = {"dtype": str(dtype).split(".")[-1], "pattern": pattern, "tensors": len(ts), "out_mbytes": out_bytes / 1e6,
         "backend": str(_backend.choose("repack", dev))}
    r["call_ms"] = _bench(ours)
    r["loop_ms"] = _bench(loop)
    r["copy_ms"] = _bench(copy)
    moved = 2 * out_bytes  # read the kept bytes + write them
    r["copy_GBps"] = moved / (r["copy_ms"] * 1e-3) / 1e9  # one large device copy: GPU-bound
    try:
        if SMOKE:
            raise RuntimeError("no profiler in --smoke")
        r["kernel_us"] = _kernel_us(ours, "repack_kernel")
        r["kernel_GBps"] = moved / (r["kernel_us"] * 1e-6) / 1e9 if r["kernel_us"] else None
        if r["kernel_GBps"]:
            r["fraction_of_copy_bandwidth"] = r["kernel_GBps"] / r["copy_GBps"]
    except Exception as e:  # noqa: BLE001  (profiler unavailable: keep the wall-clock numbers)
        r["profiler_error"] = f"{type(e).__name__}: {e}"
    r["call_GBps"] = 2 * out_bytes / (r["call_ms"] * 1e-3) / 1e9
    r["speedup_vs_loop"] = r["loop_ms"] / r["call_ms"]
    return r


def env_info():
    import triton

    if SMOKE:
        return {"device": "cpu (--smoke)", "capability": "0.0", "torch": torch.__version__, "cuda": None,
                "triton": triton.__version__, "python": platform.python_version(), "date": "", "allow_tf32": False,
                "backends": K.backends()}
    return {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "backends": K.backends(),
    }


def markdown(res: dict) -> str:
    e = res["env"]
    lines = [f"# tsprune_kernels GPU benchmarks", "",
             f"{e['device']} (sm_{e['capability'].replace('.', '')}), torch {e['torch']} (CUDA {e['cuda']}), "
             f"triton {e['triton']}, {e['date']}; TF32 for fp32 matmuls: {e['allow_tf32']}.", ""]
    t = res.get("targets", {})
    if t:
        lines += ["## Targets", "", "| target | worst case | pass |", "|---|---|---|"]
        for k, v in t.items():
            lines.append(f"| {k} | {v['value']:.3f} | {'yes' if v['pass'] else 'NO'} |")
        lines.append("")
    if res.get("masked_step"):
        lines += ["## Masked calibration step (forward + backward to x and both masks, frozen W)", "",
                  "| model | layer | T | K->N | dtype | zeros | path | unmasked ms | autograd ms | tsprune ms | "
                  "taylor2 ms | other path ms | x unmasked | x unmasked (taylor2) | autograd / tsprune | "
                  "peak vs autograd | held for bwd MB (autograd / tsprune) |",
                  "|" + "---|" * 17]
        for r in res["masked_step"]:
            if "error" in r:
                lines.append(f"| {r.get('model')} | {r.get('layer')} | error: {r['error'][:80]} |")
                continue
            c = r["cases"]
            oth = next((v["ms"] for k, v in c.items() if k.endswith("_path")), float("nan"))
            lines.append(
                f"| {r['model']} | {r['layer']} | {r['T']} | {r['K']}->{r['N']} | {r['dtype']} | {r['zero_frac']:.0%} | "
                f"{r['default_path']} | {c['unmasked']['ms']:.3f} | {c['autograd_masks']['ms']:.3f} | "
                f"{c['tsprune']['ms']:.3f} | {c['tsprune_taylor2']['ms']:.3f} | {oth:.3f} | "
                f"{r['ratio_time_vs_unmasked']:.3f} | {r['ratio_time_taylor2_vs_unmasked']:.3f} | "
                f"{r['speedup_vs_autograd']:.2f} | {r['ratio_peak_vs_autograd']:.2f} | "
                f"{c['autograd_masks']['held_for_backward_bytes'] / 1e6:.0f} / {c['tsprune']['held_for_backward_bytes'] / 1e6:.0f} |")
        lines.append("")
    if res.get("arena"):
        a = res["arena"]
        lines += ["## Arena step", ""]
        if "error" in a:
            lines.append(f"error: {a['error']}")
        else:
            lines += [f"{a['masks']} masks, {a['units']} units, ratio {a['ratio']}: ScoreArena.step "
                      f"{a['arena_ms']:.3f} ms ({a['arena_backend']}), torch backend {a['arena_torch_backend_ms']:.3f} ms, "
                      f"per-module loop + cat + topk {a['loop_ms']:.3f} ms: **{a['speedup_vs_loop']:.1f}x**; "
                      f"pruned {a['pruned_arena']} (loop {a['pruned_loop']})."]
        lines.append("")
    if res.get("repack"):
        lines += ["## Repack (one call, Chronos-Bolt-base-like weights)", "",
                  "| dtype | kept | tensors | out MB | kernel GB/s | copy GB/s | fraction of copy | call ms | "
                  "index_select loop ms | loop / call |", "|" + "---|" * 10]
        for r in res["repack"]:
            if "error" in r:
                lines.append(f"| error: {r['error'][:100]} |")
                continue
            f = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
            lines.append(f"| {r['dtype']} | {r['pattern']} | {r['tensors']} | {r['out_mbytes']:.1f} | "
                         f"{f(r.get('kernel_GBps'))} | {f(r.get('copy_GBps'))} | "
                         f"{r.get('fraction_of_copy_bandwidth', float('nan')):.2f} | {r['call_ms']:.3f} | "
                         f"{r['loop_ms']:.3f} | {r['speedup_vs_loop']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="fewer shapes, no alternative-path runs")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="epoch seconds: masked-step cases that would start later than 45 s before it are "
                        "skipped (the report is written after every case anyway)")
    p.add_argument("--smoke", action="store_true",
                   help="check the script itself on tiny CPU shapes under TRITON_INTERPRET=1 (numbers meaningless)")
    a = p.parse_args(argv)
    if a.smoke:
        global DEV, SMOKE
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("bench_gpu --smoke needs TRITON_INTERPRET=1")
            return 2
        DEV, SMOKE = "cpu", True
        K.set_backend("triton")
        for name, (d, ff, h, tps, batch) in list(MODELS.items()):
            MODELS[name] = (d // 16, ff // 16, h, 5, 3)
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device")
        return 2
    out_dir = pathlib.Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {"env": env_info(), "masked_step": [], "arena": None, "repack": []}

    def save():
        (out_dir / "gpu_bench.json").write_text(json.dumps(res, indent=1, default=str))
        (out_dir / "gpu_bench.md").write_text(markdown(res))

    try:
        res["arena"] = arena_step(*((50, 5000) if SMOKE else (1000, 500_000)))
        print(f"arena step: {res['arena']['arena_ms']:.3f} ms vs loop {res['arena']['loop_ms']:.3f} ms "
              f"({res['arena']['speedup_vs_loop']:.1f}x)", flush=True)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res["arena"] = {"error": f"{type(e).__name__}: {e}"}
    save()
    for dtype in (torch.bfloat16, torch.float32):
        for pattern in ("heads", "channels"):
            try:
                r = repack_bench(dtype, pattern)
                print(f"repack {r['dtype']} {pattern}: kernel {r.get('kernel_GBps') or 0:.0f} GB/s vs copy "
                      f"{r.get('copy_GBps') or 0:.0f} GB/s; call {r['call_ms']:.3f} ms, loop {r['loop_ms']:.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                r = {"dtype": str(dtype), "pattern": pattern, "error": f"{type(e).__name__}: {e}"}
            res["repack"].append(r)
            save()

    # most telling first (a --deadline may cut the tail): the Chronos-Bolt-base FFN input layer
    cb, tf = MODELS["chronos-bolt-base"], MODELS["timesfm-200m"]
    layers = [("chronos-bolt-base", "ffn.in", cb[0], cb[1]), ("timesfm-200m", "ffn", tf[0], tf[1]),
              ("chronos-bolt-base", "ffn.out", cb[1], cb[0]), ("chronos-bolt-base", "attn.q", cb[0], cb[0]),
              ("timesfm-200m", "attn.q", tf[0], tf[0])]  # (TimesFM's FFN is 1280 -> 1280 both ways)
    if a.quick:
        layers = [l for l in layers if l[1].startswith("ffn")]
    for model, layer, k, n in layers:
        for dname, dtype in DTYPES.items():
            for zf in ((0.0,) if a.quick else (0.0, 0.5)):
                if a.deadline and time.time() > a.deadline - 45:
                    print(f"masked step {model} {layer} {dname} zeros {zf:.0%}: skipped (--deadline)", flush=True)
                    res["masked_step"].append({"model": model, "layer": layer, "dtype": dname, "zero_frac": zf,
                                               "error": "skipped: out of time (--deadline)"})
                    continue
                try:
                    r = masked_step(model, layer, k, n, dtype, zf, a.quick)
                    print(f"masked step {model} {layer} {k}->{n} {dname} zeros {zf:.0%}: "
                          f"{r['ratio_time_vs_unmasked']:.3f}x unmasked, taylor2 {r['ratio_time_taylor2_vs_unmasked']:.3f}x, "
                          f"{r['speedup_vs_autograd']:.2f}x faster than autograd masks, "
                          f"peak {r['ratio_peak_vs_autograd']:.2f}x autograd's", flush=True)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    r = {"model": model, "layer": layer, "dtype": dname, "zero_frac": zf, "error": f"{type(e).__name__}: {e}"}
                res["masked_step"].append(r)
                save()
    ok_steps = [r for r in res["masked_step"] if "error" not in r]
    targets = {}
    if ok_steps:
        targets["masked step time / unmasked <= 1.10 (all ones, no taylor2)"] = max(
            r["ratio_time_vs_unmasked"] for r in ok_steps if r["zero_frac"] == 0.0)
        targets["masked step peak memory / autograd masks <= 0.6"] = max(r["ratio_peak_vs_autograd"] for r in ok_steps)
    if res["arena"] and "error" not in res["arena"]:
        targets["arena step speedup vs loop >= 20"] = res["arena"]["speedup_vs_loop"]
    fr = [r["fraction_of_copy_bandwidth"] for r in res["repack"] if "fraction_of_copy_bandwidth" in r]
    if fr:
        targets["repack kernel bandwidth / copy >= 0.8 (worst pattern)"] = min(fr)
    res["targets"] = {
        k: {"value": v, "pass": (v <= float(k.split("<=")[1].split()[0])) if "<=" in k else (v >= float(k.split(">=")[1].split()[0]))}
        for k, v in targets.items()
    }
    save()
    print(markdown(res))
    print(f"wrote {out_dir / 'gpu_bench.json'} and gpu_bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
