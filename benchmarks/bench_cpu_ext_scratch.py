"""Scratch timing of the C++ CPU extension (tsprune_kernels._C) against plain ATen baselines.

    python benchmarks/bench_cpu_ext_scratch.py [--reps 15] [--threads N]

Reports the best and median of interleaved repetitions (the machine may be shared; the best is
the least noisy estimate). Not a test: it only prints numbers.
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch


def load_ext():
    try:
        return importlib.import_module("tsprune_kernels._C")
    except Exception as e:  # noqa: BLE001 - fall back to a JIT build of the same sources
        print(f"(import tsprune_kernels._C failed: {e}; building with cpp_extension.load)")
        from pathlib import Path

        from torch.utils.cpp_extension import load

        root = Path(__file__).resolve().parents[1] / "csrc"
        srcs = [str(root / "bindings.cpp")] + sorted(str(p) for p in (root / "cpu").glob("*.cpp"))
        return load("tsprune_C_bench", srcs, extra_cflags=["-O3", "-fopenmp", "-march=native"],
                    extra_ldflags=["-lgomp"], extra_include_paths=[str(root)])


CLOCK = time.perf_counter


def timeit(fns: dict, reps: int) -> dict:
    """Interleaved repetitions of several callables; returns {name: (best_ms, median_ms)}."""
    for f in fns.values():
        f()
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = CLOCK()
            f()
            times[k].append((CLOCK() - t) * 1e3)
    out = {}
    for k, v in times.items():
        v.sort()
        out[k] = (v[0], v[len(v) // 2])
    return out


def show(title: str, res: dict, base: str) -> None:
    print(f"\n{title}")
    b_best, b_med = res[base]
    for k, (best, med) in res.items():
        print(f"  {k:<44s} best {best:8.2f} ms  median {med:8.2f} ms   "
              f"best/base {best / b_best:5.3f}  median/base {med / b_med:5.3f}")


def bench_masked_linear(C, reps: int) -> None:
    T, K, N = 8192, 512, 2048
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g)
    gy = torch.randn(T, N, generator=g)
    mi, mo = torch.ones(K), torch.ones(N)
    acc_i, acc_o, sq_i, sq_o = torch.zeros(K), torch.zeros(N), torch.zeros(K), torch.zeros(N)

    def base():
        torch.addmm(b, x, w.t())
        torch.mm(gy, w)

    def ours(tps=512, sq=False, accs=False, need_masks=True):
        y = C.masked_linear_fwd(x, w, b, mi, mo, 1, 1)
        C.masked_linear_bwd(gy, x, y, w, b, mi, mo, 1, 1, tps, True, False, False, need_masks,
                            need_masks, acc_i if accs else None, acc_o if accs else None,
                            sq_i if sq else None, sq_o if sq else None)

    res = timeit({
        "addmm fwd + mm bwd-to-x (baseline)": base,
        "ours fwd+bwd, mask grads returned": ours,
        "ours fwd+bwd, mask grads into acc": lambda: ours(accs=True, need_masks=False),
        "ours fwd+bwd, acc + sq (tps=512)": lambda: ours(sq=True, accs=True, need_masks=False),
        "ours fwd+bwd, acc + sq (tps=1)": lambda: ours(tps=1, sq=True, accs=True, need_masks=False),
    }, reps)
    show(f"masked_linear T={T} K={K} N={N} fp32, all-ones masks, frozen weight, need_x", res,
         "addmm fwd + mm bwd-to-x (baseline)")

    mz_i, mz_o = mi.clone(), mo.clone()
    mz_i[::8] = 0  # 1/8 of the units at zero: restricted recompute GEMMs
    mz_o[::8] = 0

    def ours_zero():
        y = C.masked_linear_fwd(x, w, b, mz_i, mz_o, 1, 1)
        C.masked_linear_bwd(gy, x, y, w, b, mz_i, mz_o, 1, 1, 512, True, False, False, True, True,
                            None, None, None, None)

    res = timeit({"addmm fwd + mm bwd-to-x (baseline)": base,
                  "ours, 1/8 of units masked to 0": ours_zero}, reps)
    show("masked_linear with zero mask units", res, "addmm fwd + mm bwd-to-x (baseline)")


def bench_repack(C, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    cases = {
        "24 x [2048,512] fp32, 1/2 rows + 1/2 cols (random sorted)": (
            [torch.randn(2048, 512, generator=g) for _ in range(24)],
            [torch.randperm(2048, generator=g)[:1024].sort().values for _ in range(24)],
            [torch.randperm(512, generator=g)[:256].sort().values for _ in range(24)]),
        "24 x [2048,512] fp32, 1/2 rows + 1/2 cols (head blocks of 64)": (
            [torch.randn(2048, 512, generator=g) for _ in range(24)],
            [torch.arange(2048).view(32, 64)[torch.randperm(32, generator=g)[:16].sort().values].reshape(-1)
             for _ in range(24)],
            [torch.arange(512).view(8, 64)[torch.randperm(8, generator=g)[:4].sort().values].reshape(-1)
             for _ in range(24)]),
        "24 x [2048,512] bf16, 1/2 rows + 1/2 cols (random sorted)": (
            [torch.randn(2048, 512, generator=g).bfloat16() for _ in range(24)],
            [torch.randperm(2048, generator=g)[:1024].sort().values for _ in range(24)],
            [torch.randperm(512, generator=g)[:256].sort().values for _ in range(24)]),
        "300 x [64,64] fp32 (many small), 1/2 rows + cols": (
            [torch.randn(64, 64, generator=g) for _ in range(300)],
            [torch.randperm(64, generator=g)[:32].sort().values for _ in range(300)],
            [torch.randperm(64, generator=g)[:32].sort().values for _ in range(300)]),
    }
    for name, (ts, rows, cols) in cases.items():
        def ref(ts=ts, rows=rows, cols=cols):
            return [t.index_select(0, r).index_select(1, c) for t, r, c in zip(ts, rows, cols)]

        got = C.repack(ts, rows, cols)
        assert all(torch.equal(a, e) for a, e in zip(got, ref()))
        res = timeit({"index_select(0).index_select(1) per tensor": ref,
                      "_C.repack": lambda ts=ts, rows=rows, cols=cols: C.repack(ts, rows, cols)}, reps)
        show(f"repack: {name}", res, "index_select(0).index_select(1) per tensor")


def bench_select(C, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g) for n in (4_000_000, 1_000_000, 30_000, 512)]
    n = sum(t.numel() for t in ts)
    k = n // 10
    res = timeit({
        "torch.cat + abs + kthvalue": lambda: torch.cat([t.abs() for t in ts]).kthvalue(k),
        "_C.kth_smallest_abs": lambda: C.kth_smallest_abs(ts, k, True),
    }, reps)
    show(f"kth_smallest_abs over {n} fp32 values in 4 tensors, k=n/10", res, "torch.cat + abs + kthvalue")
    mask = (torch.rand(n, generator=g) > 0.2).float()
    imp = torch.randn(n, generator=g)

    def prune():
        m, v = mask.clone(), imp.clone()
        C.prune_lowest_(m, v, n // 20)

    res = timeit({"clone x2 only": lambda: (mask.clone(), imp.clone()), "clone x2 + prune_lowest_": prune}, reps)
    show(f"prune_lowest_ over {n} units, k=n/20", res, "clone x2 only")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", choices=["linear", "repack", "select"], default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="process CPU time instead of wall time (robust on a shared machine; "
                         "meaningful with --threads 1)")
    a = ap.parse_args()
    if a.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if a.threads:
        torch.set_num_threads(a.threads)
    C = load_ext()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"clock {'process CPU time' if a.cpu_time else 'wall'}")
    if a.only in (None, "linear"):
        bench_masked_linear(C, a.reps)
    if a.only in (None, "repack"):
        bench_repack(C, a.reps)
    if a.only in (None, "select"):
        bench_select(C, a.reps)


if __name__ == "__main__":
    main()
