"""Pipeline benchmarks of issue 4 at Chronos-Bolt-small sizes (random init; no hub on this machine):

1. Calibration throughput (windows / s): one micro-batch forward + backward with masks on every
   site (frozen weights), tsprune (arena + fused masked_linear) vs the same model with plain PyTorch
   autograd masks (F.linear(x*m_in, W, b)*m_out with mask parameters on every Linear).
2. Inference speed-up of the repacked model at three pruning levels (magnitude criterion, one shot).

    python benchmarks/bench_pipeline.py [--batch 8] [--reps 5] [--small-config]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from _common import bench, write  # noqa: E402

import tsprune  # noqa: E402
from tsprune.pretrain import build_model  # noqa: E402

BOLT_SMALL = dict(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6, num_decoder_layers=6,
                  chronos_config=dict(context_length=2048, prediction_length=64))
BOLT_TINY = dict(d_model=128, d_kv=32, num_heads=4, d_ff=512, num_layers=2, num_decoder_layers=2,
                 chronos_config=dict(context_length=512, prediction_length=64))


def _autograd_masked_forward(self, x):
    m = self._plain_masks
    xi = x * m["in"] if m.get("in") is not None else x
    y = F.linear(xi, self.weight, self.bias)
    return y * m["out"] if m.get("out") is not None else y


def attach_autograd_masks(model, sites):
    """The baseline: a mask Parameter on each side of every site, plain autograd."""
    params = []
    for s in sites:
        lin = model.get_submodule(s.path)
        d = {}
        kw = dict(device=lin.weight.device, dtype=lin.weight.dtype, requires_grad=True)
        if s.mask_in is not None:
            d["in"] = torch.ones(lin.in_features, **kw)
        if s.mask_out is not None:
            d["out"] = torch.ones(lin.out_features, **kw)
        params += list(d.values())
        lin._plain_masks = d
        lin.forward = types.MethodType(_autograd_masked_forward, lin)
    return params


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--small-config", action="store_true", help="a tiny model (smoke test)")
    a = p.parse_args(argv)
    cfg = BOLT_TINY if a.small_config else BOLT_SMALL
    base = build_model(cfg, seed=0)
    for prm in base.parameters():
        prm.requires_grad_(False)
    L = cfg["chronos_config"]["context_length"]
    H = cfg["chronos_config"]["prediction_length"]
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(a.batch, L, generator=g).cumsum(-1)
    tgt = ctx[:, -H:] + torch.randn(a.batch, H, generator=g)

    ours = copy.deepcopy(base)
    pr = tsprune.Pruner(ours, criterion="taylor", macro_batch_size=10**9).attach()  # same work as the baseline
    plain = copy.deepcopy(base)
    mask_params = attach_autograd_masks(plain, pr.sites)
    unmasked = copy.deepcopy(base)
    # backward must traverse the whole stack, as in calibration: the first layer's weight needs grad
    x_req = next(unmasked.input_patch_embedding.parameters())
    x_req.requires_grad_(True)

    def step_ours():
        pr.adapter.loss(ours, ctx, tgt).backward()

    def step_plain():
        for mp in mask_params:
            mp.grad = None
        pr.adapter.loss(plain, ctx, tgt).backward()

    def step_unmasked():
        x_req.grad = None
        pr.adapter.loss(unmasked, ctx, tgt).backward()

    r = bench({"unmasked_frozen": step_unmasked, "autograd_masks": step_plain, "tsprune": step_ours},
              warmup=1, reps=a.reps)
    for k, v in r.items():
        v["windows_per_s"] = a.batch / (v["median_ms"] / 1e3)
    r["tsprune"]["speedup_vs_autograd_masks"] = r["autograd_masks"]["median_ms"] / r["tsprune"]["median_ms"]
    print(f"calibration step, batch {a.batch} x context {L}:")
    for k, v in r.items():
        print(f"  {k:16s} {v['median_ms']:8.1f} ms   {v['windows_per_s']:7.1f} windows/s")
    pr.detach()

    # inference at three pruning levels
    inf = {}
    ctx_i = torch.randn(32, L, generator=g).cumsum(-1)
    models = {"dense": base}
    for level in (0.25, 0.5, 0.75):
        m = copy.deepcopy(base)
        prl = tsprune.Pruner(m, criterion="magnitude", max_prune_ratio=0.95)
        prl.prune_now(ratio=level)
        models[f"pruned_{int(level * 100)}"] = prl.repack()
    fns = {}
    for name, m in models.items():
        m.eval()
        fns[name] = (lambda mm: (lambda: mm(context=ctx_i)))(m)
    with torch.no_grad():
        r2 = bench(fns, warmup=1, reps=a.reps)
    for name, v in r2.items():
        v["params"] = sum(p_.numel() for p_ in models[name].parameters())
        v["speedup"] = r2["dense"]["median_ms"] / v["median_ms"]
    print("inference, batch 32:")
    for k, v in r2.items():
        print(f"  {k:12s} {v['median_ms']:8.1f} ms  params {v['params']:>11,}  speed-up {v['speedup']:.2f}x")
    print("wrote", write("pipeline" + ("_tiny" if a.small_config else ""),
                         {"config": cfg, "batch": a.batch, "calibration": r, "inference": r2}))


if __name__ == "__main__":
    main()
