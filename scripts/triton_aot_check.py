"""Compile every tsprune Triton kernel ahead of time for a CUDA target, without a GPU.

    python scripts/triton_aot_check.py [--arch 90] [--quick]

Runs Triton's real code generator (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the ptxas that
ships with Triton) for each kernel, every autotune config, each dtype and the flag combinations
the Python wrappers use. It catches what the interpreter cannot: typing of loop-carried values,
layouts of tl.dot / tl.histogram / reshapes, register / shared-memory limits of the configs.
It does not run anything: numerical results are the interpreter tests' and the GPU suite's job.
Exit status 1 if any compile fails.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from tsprune_kernels.triton import masked_linear as ML  # noqa: E402
from tsprune_kernels.triton import select as SE  # noqa: E402
from tsprune_kernels.triton import stats as ST  # noqa: E402

P = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64", "i32": "*i32", "i64": "*i64"}


def _jit(k):
    while not isinstance(k, triton.runtime.JITFunction):
        k = k.fn
    return k


# What the JIT would specialise at run time for realistic calibration shapes (contiguous rows of a
# width divisible by 16): unit strides become the constant 1, row strides / sizes are tagged
# divisible by 16, data pointers are 16-byte aligned.
UNIT = {"sxk", "swk", "syn", "sgn", "sdk", "smi", "smo", "sxc"}
DIV16 = {"T", "N", "K", "sxt", "swn", "syt", "sgt", "sdt", "Ui", "Uo", "U", "C", "n", "n_out"}


def compile_one(kernel, types: dict, consts: dict, arch: int, num_warps=4, num_stages=3, specialise=True,
                ones=False):
    """ones=True: every integer scalar argument is the constant 1, as the JIT specialises an int
    argument equal to 1 (block 1, one token per sample, k = 1, ...): code that calls tensor methods
    on such an argument (``k.to(...)``) must still compile."""
    fn = _jit(kernel)
    consts = dict(consts)
    if specialise:
        for name in fn.arg_names:
            if name in UNIT and name not in consts:
                consts[name] = 1
    if ones:
        for name in fn.arg_names:
            if name not in consts and types[name] in ("i32", "i64"):
                consts[name] = 1
    sig = {}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in consts else types[name]
        if specialise and name not in consts and (types[name].startswith("*") or name in DIV16):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def _cfgs(kernel):
    return [(c.kwargs, c.num_warps, c.num_stages) for c in kernel.configs]


def cases(quick: bool):
    """(label, kernel, types, constexprs, num_warps, num_stages)"""
    dts = ["fp32", "bf16", "fp16"]
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    # forward
    for dt, (bias, mi, mo) in itertools.product(dts, [(True, True, True), (False, False, True), (False, False, False)]):
        for kw, nw, ns in _cfgs(ML._fwd_kernel)[: 1 if quick else None]:
            types = {"x_ptr": P[dt], "w_ptr": P[dt], "b_ptr": P[dt], "mi_ptr": P["fp32"], "mo_ptr": P["fp32"],
                     "y_ptr": P[dt], **ints("T", "N", "K", "bi", "bo", "sxt", "sxk", "swn", "swk", "syt", "syn",
                                            "smi", "smo")}
            consts = dict(kw, HAS_BIAS=bias, HAS_MIN=mi, HAS_MOUT=mo,
                          PREC="ieee" if dt == "fp32" else None, UPCAST=False)
            yield f"fwd {dt} bias={bias} mi={mi} mo={mo} {kw}", ML._fwd_kernel, types, consts, nw, ns
    # dx kernel: calibration (frozen weight: dx + both masks, taylor2 squares) and variants
    flag_sets = [
        dict(NEED_DX=True, DO_IN=True, DO_OUT=True, SQ_IN=2, SQ_OUT=2, HAS_MIN=True, HAS_MOUT=True),
        dict(NEED_DX=True, DO_IN=True, DO_OUT=True, SQ_IN=1, SQ_OUT=1, HAS_MIN=True, HAS_MOUT=True),
        dict(NEED_DX=True, DO_IN=False, DO_OUT=False, SQ_IN=0, SQ_OUT=0, HAS_MIN=False, HAS_MOUT=False),
        dict(NEED_DX=False, DO_IN=True, DO_OUT=False, SQ_IN=0, SQ_OUT=0, HAS_MIN=True, HAS_MOUT=False),
    ]
    for dt, flags in itertools.product(dts, flag_sets):
        for kw, nw, ns in _cfgs(ML._dx_kernel)[: 1 if quick else None]:
            types = {"gy_ptr": P[dt], "w_ptr": P[dt], "x_ptr": P[dt], "y_ptr": P[dt], "mi_ptr": P["fp32"],
                     "mo_ptr": P["fp32"], "dx_ptr": P[dt], "th": "fp32",
                     **{n: P["fp32"] for n in ML._SCRATCH},
                     **ints("T", "N", "K", "bi", "bo", "tps", "Ui", "Uo", "sgt", "sgn", "swn", "swk", "sxt",
                            "sxk", "syt", "syn", "sdt", "sdk", "smi", "smo")}
            consts = dict(kw, **flags, PREC="ieee" if dt == "fp32" else None, UPCAST=False)
            yield f"dx {dt} {flags} {kw}", ML._dx_kernel, types, consts, nw, ns
    for dt, sq in itertools.product(dts, [0, 1, 2]):
        types = {"g_ptr": P[dt], "v_ptr": P[dt], "m_ptr": P["fp32"], "tot": P["fp32"], "sqt": P["fp32"],
                 "part": P["fp32"], "th": "fp32", **ints("T", "C", "blk", "tps", "U", "sgt", "sgc", "svt", "svc", "sm")}
        yield f"ratio {dt} sq={sq}", ML._ratio_kernel, types, dict(SQ=sq, BT=64, BC=64), 4, 3
        tiles = {k: v for k, v in ML._zero_tiles().items() if k.startswith("B")}
        for side in ("out", "in"):
            types = {"a_ptr": P[dt], "am_ptr": P["fp32"], "w_ptr": P[dt], "b_ptr": P[dt], "m_ptr": P[dt],
                     "zunits_ptr": P["i32"], "nz_ptr": P["i32"], "tot": P["fp32"], "sqt": P["fp32"],
                     "part": P["fp32"], **ints("T", "R", "ab", "blk", "tps", "U", "sat", "sar", "sam", "swr", "swc",
                                               "smt", "smc")}
            consts = dict(tiles, HAS_AMASK=True, HAS_BIAS=side == "out", SQ=sq,
                          PREC="ieee" if dt == "fp32" else None, UPCAST=False, sar=1, smc=1, sam=1,
                          **({"swr": 1} if side == "out" else {"swc": 1}))
            yield f"zero-{side} {dt} sq={sq}", ML._zero_kernel, types, consts, 4, 3
    for dt in dts:
        types = {"w_ptr": P[dt], "mi_ptr": P["fp32"], "mo_ptr": P["fp32"], "out_ptr": P[dt],
                 **ints("N", "K", "bi", "bo", "swn", "swk", "smi", "smo")}
        yield f"fold {dt}", ML._fold_kernel, types, dict(HAS_MIN=True, HAS_MOUT=True, BN=32, BK=128), 4, 1
    for mdt in ["fp32", "bf16"]:
        types = {"mo_ptr": P[mdt], "smo": "i32", "U": "i32", "th": "fp32", "zunits_ptr": P["i32"], "nz_ptr": P["i32"]}
        yield f"compact {mdt}", ML._compact_kernel, types, dict(BLOCK=1024), 4, 1
    for acc_t, sq in itertools.product(["fp32", "fp64"], [0, 1, 2]):
        types = {"tot_ptr": P["fp32"], "sqt_ptr": P["fp32"], "part_ptr": P["fp32"], "S": "i32", "U": "i32",
                 "acc_ptr": P[acc_t], "sqacc_ptr": P[acc_t], "dm_ptr": P["fp32"]}
        consts = dict(HAS_ACC=True, HAS_SQACC=sq > 0, HAS_DM=True, SQ=sq, BU=128, BS=32)
        yield f"finalize acc={acc_t} sq={sq}", ML._finalize_kernel, types, consts, 4, 1
    # selection
    for dt in ["fp32", "fp64", "bf16", "fp16"]:
        nbits = 63 if dt == "fp64" else 31
        npass = SE._npasses(nbits)
        for p, (ign, has_mask) in itertools.product(range(npass), [(True, False), (False, False), (True, True)]):
            types = {"ptab": P["i64"], "sizes": P["i64"], "ctid": P["i64"], "cstart": P["i64"], "mask_ptr": P["fp32"],
                     "hist_ptr": P["i32"], "info_ptr": P["i32"], "k": "i32"}
            consts = dict(P=p, NBITS=nbits, IS64=dt == "fp64", DT=SE._TL[_TORCH[dt]], IGNORE_ZEROS=ign,
                          HAS_MASK=has_mask, CLAMP=has_mask, BLOCK=4096)
            yield f"hist {dt} pass {p} ign={ign} mask={has_mask}", SE._hist_kernel, types, consts, 4, 1
        types = {"hist_ptr": P["i32"], "out_ptr": P["i64" if dt == "fp64" else "i32"], "k": "i32"}
        yield f"finish {dt}", SE._finish_kernel, types, dict(NP=npass, NBITS=nbits, IS64=dt == "fp64"), 4, 1
        if dt in ("fp32", "fp64"):
            for phase in (0, 1):
                types = {"imp_ptr": P[dt], "mask_ptr": P[dt], "n": "i32", "hist_ptr": P["i32"], "ties_ptr": P["i32"],
                         "count_ptr": P["i32"], "k": "i32"}
                consts = dict(PHASE=phase, NP=npass, NBITS=nbits, IS64=dt == "fp64", BLOCK=4096)
                yield f"prune {dt} phase {phase}", SE._prune_kernel, types, consts, 4, 1
    # stats
    for dt, op in itertools.product(["fp32", "bf16", "fp16", "fp64"], range(4)):
        for bb in (1, 16, 128):
            types = {"x_ptr": P[dt], "out_ptr": P[dt], "n_out": "i32", "block": "i32"}
            consts = dict(OP=op, ACC64=dt == "fp64", BO=max(16, 2048 // bb), BB=bb)
            yield f"block_reduce {dt} op={op} BB={bb}", ST._block_reduce_kernel, types, consts, 4, 1
    for dt, acc_t in itertools.product(["fp32", "bf16", "fp16", "fp64"], ["fp32", "fp64"]):
        types = {"x_ptr": P[dt], "acc_ptr": P[acc_t], **ints("T", "C", "sxt", "sxc")}
        yield f"act_sq {dt}->{acc_t}", ST._act_sq_kernel, types, dict(ROWS=512, BT=32, BC=64), 4, 1
    for dt in ["fp32", "bf16", "fp16"]:
        types = {"imp_ptr": P[dt], "s_ptr": P["fp32"], "n": "i32", "keep": "fp32", "ema": "fp32"}
        yield f"ema {dt}", ST._ema_kernel, types, dict(BLOCK=1024), 4, 1


import torch  # noqa: E402

_TORCH = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="SM version (90 = H100 / H200)")
    ap.add_argument("--quick", action="store_true", help="first autotune config only")
    ap.add_argument("-k", default="", help="only cases whose label contains this")
    a = ap.parse_args()
    ok = bad = 0
    t0 = time.time()
    for label, kernel, types, consts, nw, ns in cases(a.quick):
        if a.k and a.k not in label:
            continue
        try:
            c = compile_one(kernel, types, consts, a.arch, nw, ns)
            compile_one(kernel, types, consts, a.arch, nw, ns, ones=True)
            if not a.quick:  # the generic (unspecialised) variant must compile too
                compile_one(kernel, types, consts, a.arch, nw, ns, specialise=False)
            smem = c.metadata.shared
            ptx = c.asm.get("ptx", "")
            feats = [f for f, pat in (("wgmma", "wgmma"), ("mma", "mma.sync"), ("cp.async", "cp.async"),
                                      ("tma", "cp.async.bulk")) if pat in ptx]
            ok += 1
            note = "  OVER SHARED-MEMORY LIMIT (autotune skips it)" if smem > 232448 else ""
            print(f"ok   {label}  (shared {smem} B; {','.join(feats) or '-'}){note}")
        except Exception as e:  # noqa: BLE001
            bad += 1
            msg = str(e).strip().splitlines()
            print(f"FAIL {label}: {type(e).__name__}: {' | '.join(msg[-6:])[:1500]}")
    print(f"{ok} compiled, {bad} failed for sm_{a.arch} with Triton {triton.__version__} in {time.time() - t0:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
