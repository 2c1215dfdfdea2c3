"""How the embedded default model was made: a tiny Chronos-Bolt pre-trained from scratch.

    python -m tsprune.pretrain --out python/tsprune/default [--steps 3000] [--seed 0]

Architecture: chronos-forecasting's real ChronosBoltModelForForecasting (T5 encoder-decoder) at a
tiny size (DEFAULT_CONFIG). Data: synthetic series (tsprune.synthetic: Gaussian-process kernel
mixtures, trends, seasonalities, level shifts, noise) plus, when ../shared/data is present, the
*train* splits of ETTh2, exchange_rate and national_illness. ETTh1 is deliberately left out, so the
main job's zero-shot number on ETTh1 is a real zero-shot number. Deterministic for a seed on one
machine (single-threaded data generation, seeded torch).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

DEFAULT_CONTEXT = 512
DEFAULT_HORIZON = 96

DEFAULT_CONFIG = dict(
    d_model=64,
    d_kv=16,
    num_heads=4,
    d_ff=256,
    num_layers=2,
    num_decoder_layers=2,
    dropout_rate=0.0,
    feed_forward_proj="relu",
    dense_act_fn="relu",
    is_encoder_decoder=True,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    initializer_factor=0.05,
    layer_norm_epsilon=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    vocab_size=2,  # decoder start + [REG]; Chronos-Bolt sets it again itself
    chronos_config=dict(
        context_length=DEFAULT_CONTEXT,
        prediction_length=DEFAULT_HORIZON,
        input_patch_size=16,
        input_patch_stride=16,
        quantiles=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        use_reg_token=True,
    ),
)


def build_model(overrides: dict | None = None, seed: int = 0):
    """A randomly initialised Chronos-Bolt from DEFAULT_CONFIG (plus ``overrides``)."""
    from chronos.chronos_bolt import ChronosBoltModelForForecasting
    from transformers import T5Config

    cfg = {**DEFAULT_CONFIG, **(overrides or {})}
    if overrides and "chronos_config" in overrides:
        cfg["chronos_config"] = {**DEFAULT_CONFIG["chronos_config"], **overrides["chronos_config"]}
    torch.manual_seed(seed)
    model = ChronosBoltModelForForecasting(T5Config(**cfg))
    model.eval()
    return model


def _real_series(lookback: int) -> list[np.ndarray]:
    """Train-split series (per variable) of the real files present, ETTh1 excluded."""
    from .data import load_csv, resolve_csv, split_borders

    out = []
    for name in ("ETTh2", "exchange_rate", "national_illness"):
        try:
            path = resolve_csv(name, download=False)
        except FileNotFoundError:
            continue
        values, _ = load_csv(path)
        (t0, t1), _, _ = split_borders(path.stem, len(values), lookback=1)
        for v in range(values.shape[1]):
            out.append(values[t0:t1, v].astype(np.float32))
    return out


def _sample_batch(rng, pool, batch, length):
    ctx, tgt = [], []
    for _ in range(batch):
        s = pool[rng.integers(len(pool))]
        if len(s) < length + 8:
            s = np.concatenate([np.full(length + 8 - len(s), np.nan, np.float32), s])
        start = rng.integers(0, len(s) - length + 1)
        w = s[start : start + length]
        ctx.append(w[:-DEFAULT_HORIZON])
        tgt.append(w[-DEFAULT_HORIZON:])
    return torch.from_numpy(np.stack(ctx)), torch.from_numpy(np.stack(tgt))


def pretrain(steps: int = 3000, batch: int = 64, lr: float = 2e-3, seed: int = 0, log=print):
    from .synthetic import generate

    rng = np.random.default_rng(seed)
    length = DEFAULT_CONTEXT + DEFAULT_HORIZON
    synth = list(generate(2000, 2 * length, seed=seed))
    real = _real_series(DEFAULT_CONTEXT)
    log(f"pretrain: {len(synth)} synthetic series, {len(real)} real train-split series")
    model = build_model(seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    t0 = time.time()
    for step in range(steps):
        pool = real if real and rng.random() < 0.3 else synth
        ctx, tgt = _sample_batch(rng, pool, batch, length)
        loss = model(context=ctx, target=tgt).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {float(loss.detach()):.4f}  {time.time() - t0:.0f}s")
    model.eval()
    return model, {"steps": steps, "batch": batch, "lr": lr, "seed": seed,
                   "n_synthetic": len(synth), "n_real": len(real)}


def main(argv=None):
    from .plan import save_pruned

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, info = pretrain(a.steps, a.batch, a.lr, a.seed)
    save_pruned(model, a.out, extra={"pretrain": info, "made_by": "python -m tsprune.pretrain"})
    print(f"saved {sum(p.numel() for p in model.parameters()):,} parameters to {a.out}")


if __name__ == "__main__":
    main()
