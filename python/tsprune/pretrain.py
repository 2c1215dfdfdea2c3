"""How the embedded default model is made: a Chronos-Bolt pre-trained from scratch on a corpus
generated on the fly (tsprune.corpus).

    python -m tsprune.pretrain --ckpt runs/pretrain/ckpt.pt --steps 6000      # train (resumable)
    python -m tsprune.pretrain --ckpt runs/pretrain/ckpt.pt --export python/tsprune/default

Architecture: chronos-forecasting's real ``ChronosBoltModelForForecasting`` (T5 encoder-decoder) at
the official "tiny" shape (d_model 256, 4+4 layers, 4 heads of 64, d_ff 1024, ReLU; 9.0M
parameters), context 512, prediction length 96, patches of 16. Data (tsprune.corpus.Corpus):
KernelSynth-style GP compositions, procedural series (trends, seasonalities, regimes, intermittent
demand, random frequencies) and TSMixup-style mixtures of the TRAIN splits of ETTh2,
exchange_rate and national_illness (when found offline). ETTh1 is never read, so the main job's
ETTh1 zero-shot number is a real zero-shot number.

Training: AdamW, linear warm-up then cosine decay over ``--steps``, gradient clipping 1.0, bf16
autocast on a GPU and on CPUs with native bf16 (``--amp``). ``--device`` picks where it trains
(CUDA when available); ``--workers N`` generates the corpus in N processes, which a GPU needs (one
core makes ~2-3 batches of 256 per second); ``scripts/gpu_pretrain.sh`` runs it on a lent GPU;
``--init DIR`` starts from a saved model's weights; ``--periodic SHARE`` mixes clean periodic
series into the corpus (tsprune.corpus.periodic_series). A checkpoint (model, optimiser,
step, RNG state) is written atomically every ``--ckpt-minutes`` and at the end; rerunning the same
command resumes from it (``--steps`` may be raised on resume: the schedule is a function of
step / steps); with ``--max-minutes`` the cosine runs on whichever of step / steps and
training time / max-minutes is further along, so a time-boxed run still ends fully decayed
(the steps actually done are recorded). Every log line also goes to ``<ckpt>.log.jsonl``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import time

import numpy as np
import torch

DEFAULT_CONTEXT = 512
DEFAULT_HORIZON = 96
REAL_SOURCES = ("ETTh2", "exchange_rate", "national_illness")

DEFAULT_CONFIG = dict(
    d_model=256,
    d_kv=64,
    num_heads=4,
    d_ff=1024,
    num_layers=4,
    num_decoder_layers=4,
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


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (avx512_bf16 / amx), so autocast is faster."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine in ``progress`` (0..1) to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _atomic_save(obj, path: pathlib.Path) -> None:
    from .checkpoint import atomic_write

    atomic_write(path, lambda f: torch.save(obj, f))


class _Log:
    def __init__(self, path: pathlib.Path | None):
        self.path = path

    def __call__(self, msg: str, **rec) -> None:
        print(msg, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"t": time.time(), "msg": msg, **rec}) + "\n")


def _monitor_batch(seed: int, real: list[np.ndarray], n: int = 256):
    """A fixed batch (context, target) from the corpus with its own seed, to follow the loss."""
    from .corpus import Corpus

    c = Corpus(DEFAULT_CONTEXT + DEFAULT_HORIZON, DEFAULT_CONTEXT, np.random.default_rng(10_000 + seed),
               real, pool_size=64, refresh=0)
    w = torch.from_numpy(c.sample(n))
    return w[:, :DEFAULT_CONTEXT], w[:, DEFAULT_CONTEXT:]


#: Periods of the seasonal probe: sub-patch (12), the hourly day that ETTh1 / ETTh2 hinge on (24),
#: three patches exactly (48) and the hourly week (168).
PROBE_PERIODS = (12, 24, 48, 168)


def seasonal_probe(model, periods=PROBE_PERIODS, n_phase: int = 8) -> dict:
    """How well ``model`` (Chronos-Bolt, context ``DEFAULT_CONTEXT``) continues clean periodic
    series: for each period, a sine and a sharp daily-dip square wave (1/6 of the period at -3,
    the rest at 0.5) at ``n_phase`` phases, median forecast over ``DEFAULT_HORIZON`` steps; returns
    ``{"p24": MSE / variance of the series, ..., "mean": mean of them}`` (0: perfect, ~1: a flat
    line at the series' mean; a target segment of the long period can be flat, hence the variance
    of the whole series). A model predicting fewer steps is scored over those. Deterministic; float32, no autocast; the model's device and mode kept."""
    dev = next(model.parameters()).device
    t = np.arange(DEFAULT_CONTEXT + DEFAULT_HORIZON, dtype=np.float64)
    qs = list(model.chronos_config.quantiles)
    mi = qs.index(0.5) if 0.5 in qs else len(qs) // 2
    out = {}
    was_training = model.training
    model.eval()
    try:
        for per in periods:
            rows = []
            for k in range(n_phase):
                ph = t + k * per / n_phase
                rows += [np.sin(2 * np.pi * ph / per), np.where(ph % per < per / 6, -3.0, 0.5)]
            w = torch.tensor(np.stack(rows), dtype=torch.float32, device=dev)
            x, y = w[:, :DEFAULT_CONTEXT], w[:, DEFAULT_CONTEXT:]
            with torch.no_grad():
                q = model(context=x).quantile_preds[:, mi, :y.shape[1]].float()
            y = y[:, :q.shape[1]]  # a model with a shorter prediction length: scored over its own
            out[f"p{per}"] = round(float(((q - y) ** 2).mean(1).div(w.var(1)).mean()), 4)
    finally:
        model.train(was_training)
    out["mean"] = round(float(np.mean([out[f"p{p}"] for p in periods])), 4)
    return out


class _CorpusStream(torch.utils.data.IterableDataset):
    """Corpus batches generated in DataLoader worker processes (``--workers``): on a GPU the
    generator (KernelSynth Choleskys, procedural series, mixtures: ~0.3-0.5 s per batch of 256 on
    one core) would otherwise starve the training step. Worker ``i`` of ``n`` draws from its own
    Corpus seeded by (seed, the step training resumes at, i), with a pool of ``pool_size / n``
    series, and yields (windows [batch, length] float32, source counts [4], replaced-window count)
    per batch. The stream is reproducible for a given resume history, not step-for-step equal to
    the in-process one (``workers=0``, whose RNG state the checkpoint restores exactly)."""

    def __init__(self, seed: int, start_step: int, real: list, pool_size: int, batch: int, periodic: float = 0.0):
        super().__init__()
        self.seed, self.start_step, self.real, self.pool_size, self.batch = seed, start_step, real, pool_size, batch
        self.periodic = periodic

    def __iter__(self):
        from .corpus import Corpus

        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.start_step, wid]))
        c = Corpus(DEFAULT_CONTEXT + DEFAULT_HORIZON, DEFAULT_CONTEXT, rng, self.real,
                   pool_size=max(16, self.pool_size // n), periodic=self.periodic)
        yield from _batches(c, self.batch)


def _batches(c, batch: int):
    """Endless (windows [batch, length] float32 tensor, source counts [4], replaced windows) of one
    Corpus: the one batch protocol of the in-process generator and of the worker processes."""
    while True:
        before, rej = c.counts.copy(), c.rejected
        w = torch.from_numpy(c.sample(batch))
        yield w, c.counts - before, c.rejected - rej


@contextlib.contextmanager
def _env(**values: str):
    """Environment variables set inside, restored (or removed) afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_SHAPE_KEYS = ("d_model", "d_ff", "num_heads", "d_kv", "num_layers", "num_decoder_layers")


def _init_weights(path: pathlib.Path):
    """(state dict in float32, shape overrides, description) of a saved, unpruned Chronos-Bolt."""
    from .checkpoint import load_pruned

    m = load_pruned(path)  # validates the directory (checksums, fields) and builds no code from it
    plan = getattr(m, "tsprune_plan", None)
    if plan is not None and any((plan.linears, plan.keep, plan.attrs, plan.params)):
        raise ValueError(f"pretrain: --init {path} is a pruned model; pre-training needs the full shape")
    cfg = m.config.to_dict()
    shape = {k: cfg[k] for k in _SHAPE_KEYS if k in cfg}
    info = json.loads((path / "meta.json").read_text()).get("extra", {}).get("pretrain", {})
    desc = f"{path} ({sum(p.numel() for p in m.parameters()):,} parameters" + (
        f", pre-trained {info['steps_done']} steps" if "steps_done" in info else "") + ")"
    return {k: v.float() for k, v in m.state_dict().items()}, shape, desc


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"pretrain: --device {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("pretrain: --device cuda was asked for but torch sees no CUDA device")
    return dev


def pretrain(ckpt: pathlib.Path, steps: int = 6000, batch: int = 256, lr: float = 1e-3, warmup: int = 300,
             seed: int = 0, amp: bool = True, ckpt_minutes: float = 5.0, max_minutes: float | None = None,
             pool_size: int = 2048, shape: dict | None = None, device: str | torch.device = "cpu",
             workers: int = 0, init: str | pathlib.Path | None = None, periodic: float = 0.0):
    """Train (or resume) until ``steps`` or ``max_minutes``; returns (model, info).

    ``shape``: overrides of DEFAULT_CONFIG (d_model, d_kv, num_heads, d_ff, layers); stored in the
    checkpoint, so a resumed or exported run rebuilds the same shape. ``device``: where the model
    trains (bf16 autocast on that device type when ``amp``). ``workers``: corpus batches generated
    in that many worker processes (:class:`_CorpusStream`); 0 generates them in this process.
    ``init``: a new run (no checkpoint yet) starts from the weights of this saved model directory
    (written by ``save_pruned``, e.g. an earlier export; unpruned), its shape, and a fresh optimiser
    and schedule; recorded in the checkpoint. Ignored when resuming. ``periodic``: the corpus share
    of clean periodic series (:func:`tsprune.corpus.periodic_series`); stored in the checkpoint,
    whose value wins on resume."""
    from .corpus import SOURCES, Corpus, real_train_series

    ckpt = pathlib.Path(ckpt)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    log = _Log(ckpt.with_name(ckpt.name + ".log.jsonl"))
    real, real_desc = real_train_series(REAL_SOURCES)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False) if ckpt.is_file() else None
    if saved is not None:  # the checkpoint's shape wins over the command line's
        shape = saved["config"].get("shape", shape)
        periodic = saved["config"].get("periodic", 0.0)
    init_sd, init_desc = None, None
    if saved is None and init is not None:
        init_sd, shape, init_desc = _init_weights(pathlib.Path(init))
    elif saved is not None:
        init_desc = saved["config"].get("init")
    shape = dict(shape or {})
    dev = torch.device(device)
    model = build_model(shape, seed=seed)
    if init_sd is not None:
        model.load_state_dict(init_sd)
    model = model.to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    state = {"step": 0, "samples": 0, "wall_s": 0.0, "counts": [0] * len(SOURCES)}
    rng = np.random.default_rng(seed)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        state["counts"] = list(state.get("counts", [])) + [0] * (len(SOURCES) - len(state.get("counts", [])))
        rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
        saved = None  # free the loaded copy: the model and optimiser hold the state now
        log(f"pretrain: resumed from {ckpt} at step {state['step']}")
    elif init_desc is not None:
        log(f"pretrain: initialised from {init_desc}")
    if workers > 0:
        # spawned workers with one BLAS / OpenMP thread each: the generator's Choleskys in
        # several multi-threaded BLAS pools at once oversubscribe the cores (measured 6x slower)
        with _env(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"):
            batches = iter(torch.utils.data.DataLoader(
                _CorpusStream(seed, state["step"], real, pool_size, batch, periodic), batch_size=None, num_workers=workers,
                prefetch_factor=4, persistent_workers=True, pin_memory=dev.type == "cuda",
                multiprocessing_context="spawn"))
    else:  # in this process, from the checkpointed RNG: an exact resume
        batches = _batches(Corpus(DEFAULT_CONTEXT + DEFAULT_HORIZON, DEFAULT_CONTEXT, rng, real,
                                  pool_size=pool_size, periodic=periodic), batch)
    counts, rejected = np.zeros(len(SOURCES), np.int64), 0  # since the last checkpoint / since this process started
    mon_ctx, mon_tgt = (t.to(dev) for t in _monitor_batch(seed, real))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretrain: {n_params:,} parameters; real train splits: {real_desc}; amp={'bf16' if amp else 'off'}; "
        f"device={dev}; workers={workers}; threads={torch.get_num_threads()}; steps={steps} batch={batch} lr={lr}; "
        f"periodic share {periodic}")

    def save():
        state["counts"] = [int(a + b) for a, b in zip(state["counts"], counts)]
        counts[:] = 0
        _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state,
                      "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                      "config": {"steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "seed": seed,
                                 "amp": amp, "real": real_desc, "shape": shape, "device": str(dev),
                                 "workers": workers, "init": init_desc, "periodic": periodic}}, ckpt)

    t_start = time.time()
    wall0 = state["wall_s"]
    last_ckpt = time.time()
    run_loss = None
    def progress() -> float:
        # the schedule ends at --steps or at --max-minutes of training, whichever comes first
        frac = (state["step"] - warmup) / max(1, steps - warmup)
        if max_minutes is not None:
            frac = max(frac, state["wall_s"] / (max_minutes * 60))
        return frac

    while progress() < 1.0:
        s = state["step"]
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(s, progress(), warmup)
        w, c, r = next(batches)
        counts += np.asarray(c, np.int64)
        rejected += int(r)
        w = w.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(context=w[:, :DEFAULT_CONTEXT], target=w[:, DEFAULT_CONTEXT:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] = s + 1
        state["samples"] += batch
        state["wall_s"] = wall0 + time.time() - t_start
        lv = float(loss.detach())
        run_loss = lv if run_loss is None else 0.98 * run_loss + 0.02 * lv
        if s % 50 == 0 or state["step"] == steps:
            rec = {"step": state["step"], "loss": lv, "loss_ema": run_loss, "grad_norm": float(gn),
                   "lr": opt.param_groups[0]["lr"], "samples": state["samples"], "wall_s": state["wall_s"],
                   "rejected_windows": rejected}
            if s % 250 == 0 or state["step"] == steps:
                model.eval()
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    rec["monitor_loss"] = float(model(context=mon_ctx, target=mon_tgt).loss)
                rec["seasonal_probe"] = seasonal_probe(model)
                model.train()
            log(f"step {state['step']:6d}  loss {lv:.4f} (ema {run_loss:.4f})  "
                f"{'monitor %.4f  ' % rec['monitor_loss'] if 'monitor_loss' in rec else ''}"
                f"{'probe %.3f  ' % rec['seasonal_probe']['mean'] if 'seasonal_probe' in rec else ''}"
                f"lr {rec['lr']:.2e}  {state['wall_s']:.0f}s", **rec)
        if time.time() - last_ckpt > ckpt_minutes * 60:
            save()
            last_ckpt = time.time()
    if state["step"] < steps:
        log(f"pretrain: --max-minutes {max_minutes} of training reached at step {state['step']}")
    save()
    model.eval()
    return model, info_from(state, steps, batch, lr, warmup, seed, amp, real_desc, periodic, init_desc)


def info_from(state, steps, batch, lr, warmup, seed, amp, real_desc, periodic=0.0, init=None) -> dict:
    from .corpus import SOURCES

    counts = list(state["counts"]) + [0] * (len(SOURCES) - len(state["counts"]))
    return {"steps_done": int(state["step"]), "steps_planned": int(steps), "batch": batch, "lr": lr,
            "warmup": warmup, "seed": seed, "amp": "bf16" if amp else "off",
            "samples_seen": int(state["samples"]), "wall_s": round(float(state["wall_s"]), 1),
            "source_counts": {k: int(v) for k, v in zip(SOURCES, counts)}, "periodic_share": periodic,
            "init": init, "real_train_splits": real_desc, "etth1_used": False}


def export(ckpt: pathlib.Path, out: pathlib.Path, storage: str = "bfloat16") -> None:
    """Write the checkpoint's model with tsprune.save_pruned (weights stored in ``storage``)."""
    from .checkpoint import save_pruned

    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    c = saved["config"]
    model = build_model(c.get("shape") or {}, seed=c["seed"])
    model.load_state_dict(saved["model"])
    model.eval()
    info = info_from(saved["state"], c["steps"], c["batch"], c["lr"], c["warmup"], c["seed"], c["amp"], c["real"],
                     c.get("periodic", 0.0), c.get("init"))
    made_by = f"python -m tsprune.pretrain --steps {c['steps']} --seed {c['seed']}" + (
        f" --periodic {info['periodic_share']}" if info["periodic_share"] else "")
    extra = {"pretrain": info, "made_by": made_by}
    kw = {} if storage == "float32" else {"storage_dtype": getattr(torch, storage)}
    save_pruned(model, out, extra=extra, **kw)
    print(f"exported {sum(p.numel() for p in model.parameters()):,} parameters (step {info['steps_done']}) to {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/pretrain/ckpt.pt", help="checkpoint file (resumed if present)")
    p.add_argument("--export", default=None, help="only write the checkpoint's model to this directory")
    p.add_argument("--probe", default=None, metavar="MODEL",
                   help="only print the seasonal probe (JSON) of a saved model (a directory, or 'default')")
    p.add_argument("--storage", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--pool-size", type=int, default=2048)
    p.add_argument("--periodic", type=float, default=0.0, metavar="SHARE",
                   help="share of clean periodic series in the corpus, in [0, 1) (default 0; a resumed run keeps its own)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--init", default=None,
                   help="a new run starts from this saved model directory's weights and shape (e.g. an export)")
    p.add_argument("--workers", type=int, default=0,
                   help="corpus generation in this many worker processes (0: in this process, exact resume)")
    p.add_argument("--d-model", type=int, default=None, help="residual width (default 256, the official tiny)")
    p.add_argument("--d-ff", type=int, default=None, help="FFN width (default 1024)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
    p.add_argument("--d-kv", type=int, default=None, help="head dim (default 64)")
    p.add_argument("--layers", type=int, default=None, help="encoder and decoder layers each (default 4)")
    a = p.parse_args(argv)
    shape = {k: v for k, v in (("d_model", a.d_model), ("d_ff", a.d_ff), ("num_heads", a.heads),
                               ("d_kv", a.d_kv), ("num_layers", a.layers), ("num_decoder_layers", a.layers))
             if v is not None}
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.export:
        export(pathlib.Path(a.ckpt), pathlib.Path(a.export), a.storage)
        return
    if a.probe:
        from .models import load_model

        try:
            m = load_model(a.probe)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise SystemExit(f"error: pretrain --probe {a.probe}: {e}") from None
        if getattr(m, "chronos_config", None) is None:
            raise SystemExit(f"error: pretrain --probe {a.probe}: not a Chronos-Bolt model")
        print(json.dumps(seasonal_probe(m.float())))
        return
    if a.workers < 0:
        raise SystemExit(f"error: pretrain: --workers must be >= 0, got {a.workers}")
    if not 0.0 <= a.periodic < 1.0:
        raise SystemExit(f"error: pretrain: --periodic must be in [0, 1), got {a.periodic}")
    try:
        dev = pick_device(a.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    amp = (dev.type == "cuda" or cpu_has_bf16()) if a.amp == "auto" else a.amp == "bf16"
    try:
        pretrain(pathlib.Path(a.ckpt), a.steps, a.batch, a.lr, a.warmup, a.seed, amp, a.ckpt_minutes,
                 a.max_minutes, a.pool_size, shape, device=dev, workers=a.workers, init=a.init,
                 periodic=a.periodic)
    except ValueError as e:  # bad input: one line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
