"""CPU kernel benchmarks of issue 2 (one run, side by side, median after warm-up):

1. One calibration step of a masked Linear at the Chronos-Bolt-small FFN shape (8192 tokens,
   512 -> 2048, fp32): forward + backward to x and both masks, frozen weight. Cases: the same
   step without masks; plain PyTorch autograd masks (F.linear(x*m_in, W, b)*m_out with mask
   parameters, the paper's formulation); tsprune masked_linear on the C++ backend and on the torch backend.
   Masks all ones (the first macro step) and 0/1 with half the units pruned (mid-calibration).
2. Repack of a Chronos-Bolt-small-like set of weights (12 layers of q,k,v,o 512x512, wi 2048x512,
   wo 512x2048, half the rows and half the columns kept) vs a per-tensor index_select loop;
   ``--repack-large`` adds 24 tensors of 2048x512 (half the rows and columns kept).
3. Global k-th smallest |value| over 4 tensors (4M, 1M, 30K, 512 fp32 values, k = n/10) vs
   torch.cat + abs + kthvalue.

    python benchmarks/bench_cpu_kernels.py [--tokens 8192] [--reps 7] [--repack-large] [--masked-only]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench, write  # noqa: E402

import tsprune_kernels as K  # noqa: E402
from tsprune_kernels import _backend  # noqa: E402


def backends_of(cases: dict) -> dict:
    """Untimed set-up per case for _common.bench: ``tsprune_<b>`` runs with backend b forced
    (K.set_backend), every other case with the automatic choice."""
    return {k: (lambda b=k[len("tsprune_"):] if k.startswith("tsprune_") else "auto": K.set_backend(b))
            for k in cases}


def masked_step_cases(T, k, n, zero_frac):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, k, generator=g).requires_grad_(True)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    gy = torch.randn(T, n, generator=g)
    mi0 = (torch.rand(k, generator=g) >= zero_frac).float()
    mo0 = (torch.rand(n, generator=g) >= zero_frac).float()

    def unmasked():
        x.grad = None
        F.linear(x, w, b).backward(gy)

    mi_p, mo_p = mi0.clone().requires_grad_(True), mo0.clone().requires_grad_(True)

    def autograd_masks():
        x.grad = mi_p.grad = mo_p.grad = None
        (F.linear(x * mi_p, w, b) * mo_p).backward(gy)

    acc_i, acc_o = torch.zeros(k), torch.zeros(n)
    mi_l, mo_l = mi0.clone().requires_grad_(True), mo0.clone().requires_grad_(True)

    def ours(backend):
        def f():
            x.grad = None
            K.masked_linear(x, w, b, mi_l, mo_l, grad_acc_in=acc_i, grad_acc_out=acc_o).backward(gy)
        return f

    cases = {"unmasked": unmasked, "autograd_masks": autograd_masks, "tsprune_torch": ours("torch")}
    if _backend.cpp_available():
        cases["tsprune_cpp"] = ours("cpp")
    return cases


def repack_cases(layers=12, d=512, ff=2048, shapes=None):
    g = torch.Generator().manual_seed(0)
    shapes = shapes or [(d, d)] * 4 + [(ff, d), (d, ff)]
    ts = [torch.randn(s, generator=g) for _ in range(layers) for s in shapes]
    keep = lambda m: torch.randperm(m, generator=g)[: m // 2].sort().values  # noqa: E731
    rows = [keep(t.shape[0]) for t in ts]
    cols = [keep(t.shape[1]) for t in ts]

    def loop():
        return [t.index_select(0, r).index_select(1, c) for t, r, c in zip(ts, rows, cols)]

    def ours(backend):
        def f():
            return K.repack(ts, rows, cols)
        return f

    cases = {"index_select_loop": loop, "tsprune_torch": ours("torch")}
    if _backend.cpp_available():
        cases["tsprune_cpp"] = ours("cpp")
    mb = sum(t.numel() for t in ts) * 4 / 4 / 2**20  # bytes written (a quarter of each tensor)
    return cases, mb


def select_cases(sizes=(4_000_000, 1_000_000, 30_000, 512)):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g) for n in sizes]
    k = sum(sizes) // 10

    def cat_kthvalue():
        return torch.cat([t.abs() for t in ts]).kthvalue(k).values

    def ours(backend):
        def f():
            return K.global_kth_smallest(ts, k)
        return f

    cases = {"cat_abs_kthvalue": cat_kthvalue, "tsprune_torch": ours("torch")}
    if _backend.cpp_available():
        cases["tsprune_cpp"] = ours("cpp")
    want = cat_kthvalue()  # no exact zeros in randn: ignore_zeros changes nothing
    assert all(torch.equal(f(), want) for f in cases.values())
    return cases


def _ratio_table(cases: dict, reps: int, baseline: str, short: str, title: str) -> dict:
    """Bench ``cases`` (each tsprune_<b> case with backend b forced), add ``<short>_over_this`` =
    baseline median / the case's median, print the table under ``title``; returns the results."""
    r = bench(cases, reps=reps, setup=backends_of(cases))
    for v in r.values():
        v[f"{short}_over_this"] = r[baseline]["median_ms"] / v["median_ms"]
    print(title)
    for k, v in r.items():
        print(f"  {k:18s} {v['median_ms']:8.2f} ms  {short} / this = {v[f'{short}_over_this']:.2f}")
    return r


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--repack-large", action="store_true", help="also repack 24 tensors of 2048x512")
    p.add_argument("--masked-only", action="store_true",
                   help="only the masked-step section (A/B runs of two builds); writes cpu_kernels_masked.json")
    a = p.parse_args(argv)
    # which build is measured (a worktree needs PYTHONPATH=<worktree>:<worktree>/python)
    print("tsprune_kernels:", K.__file__, "| _C:", getattr(_backend._C, "__file__", None))
    out = {"masked_step": {}, "repack": {}, "module": K.__file__}
    for zf in (0.0, 0.5):
        r = bench(c := masked_step_cases(a.tokens, 512, 2048, zf), reps=a.reps, setup=backends_of(c))
        base = r["unmasked"]["median_ms"]
        for k, v in r.items():
            v["x_unmasked"] = v["median_ms"] / base
            v["autograd_over_this"] = r["autograd_masks"]["median_ms"] / v["median_ms"]
        out["masked_step"][f"zeros={zf}"] = r
        print(f"masked step, T={a.tokens}, 512->2048 fp32, mask zeros {zf:.0%}:")
        for k, v in r.items():
            print(f"  {k:16s} {v['median_ms']:8.1f} ms  {v['x_unmasked']:.3f}x unmasked  "
                  f"autograd masks / this = {v['autograd_over_this']:.2f}")
    if not a.masked_only:
        other_sections(out, a)
    K.set_backend("auto")
    print("wrote", write("cpu_kernels_masked" if a.masked_only else "cpu_kernels", out))


def other_sections(out: dict, a) -> None:
    """Repack and global select (everything but the masked step), into ``out``."""
    cases, mb = repack_cases()
    out["repack"] = r = _ratio_table(cases, a.reps, "index_select_loop", "loop",
                                     "repack, 72 tensors (12 layers of Chronos-Bolt-small shapes), half rows x half cols:")
    for v in r.values():
        v["GBps_written"] = mb / 1024 / (v["median_ms"] / 1e3)
    if a.repack_large:
        cases, _ = repack_cases(layers=24, shapes=[(2048, 512)])
        out["repack_large"] = _ratio_table(cases, a.reps, "index_select_loop", "loop",
                                           "repack, 24 tensors of 2048x512, half rows x half cols:")
    out["select"] = _ratio_table(select_cases(), a.reps, "cat_abs_kthvalue", "cat",
                                 "global k-th smallest |value|, 5.03M fp32 values in 4 tensors, k = n/10:")


if __name__ == "__main__":
    main()
