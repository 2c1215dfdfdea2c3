"""Experiment (issue 10, not part of the package): does continued pre-training of the 2.5M candidate
(models/candidate-bolt-2.5m) learn seasonal continuation faster when half of every batch is a clean
periodic series (1-3 components: sines, pulses / dips, sawtooths, random harmonic waveforms, at
hourly / daily / weekly / monthly periods, slightly jittered, light noise and trend)?

    PYTHONPATH=python:. python benchmarks/exp_periodic_corpus.py periodic|default STEPS OUTDIR

AdamW lr 3e-4 (fresh), batch 64, bf16 autocast, one thread; logs to OUTDIR/log.jsonl every 250
steps: training loss, tsprune.pretrain.seasonal_probe, and the MSE on 2,048 ETTh2 h96 validation
windows (ETTh1 is never read); the weights go to OUTDIR/state.pt at every log. Results in
benchmarks/README.md "Pre-training the next default model"."""
import sys, time, json, math, pathlib
import numpy as np, torch
torch.set_num_threads(1)
from tsprune.models import load_model
from tsprune.corpus import Corpus, real_train_series
from tsprune.pretrain import seasonal_probe, REAL_SOURCES, DEFAULT_CONTEXT as C, DEFAULT_HORIZON as H
from tsprune.adapters import get_adapter
from tsprune.data import make_task

mode, steps, out = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
rng = np.random.default_rng(1)
real, _ = real_train_series(REAL_SOURCES)
corp = Corpus(C + H, C, rng, real, pool_size=256)

def periodic(rng, L):
    t = np.arange(L, dtype=np.float64)
    x = np.zeros(L)
    for _ in range(int(rng.integers(1, 4))):
        per = float(rng.choice([6, 7, 12, 24, 24, 24, 48, 96, 168, 30, 52, 365])) * (1 if rng.random() < 0.8 else rng.uniform(0.7, 1.4))
        ph = rng.uniform(0, per)
        u = ((t + ph) % per) / per
        kind = rng.integers(4)
        if kind == 0:
            w = np.sin(2 * np.pi * u)
        elif kind == 1:  # dips / pulses
            w = np.where(u < rng.uniform(0.05, 0.4), rng.normal(0, 2), 0.0)
        elif kind == 2:  # sawtooth
            w = u - 0.5
        else:  # random smooth waveform: a few harmonics
            w = sum(rng.normal(0, 1 / (k + 1)) * np.sin(2 * np.pi * (k + 1) * u + rng.uniform(0, 6.3)) for k in range(4))
        x += rng.lognormal(0, 0.7) * w
    x += rng.normal(0, 0.02) * t * rng.random() + rng.uniform(0, 0.5) * rng.standard_normal(L) * np.std(x)
    return x.astype(np.float32)

def sample(b):
    w = torch.from_numpy(corp.sample(b))
    if mode == "periodic":
        k = b // 2
        xs = np.stack([periodic(rng, C + H) * float(np.exp(rng.uniform(math.log(0.1), math.log(100)))) + rng.normal(0, 10) for _ in range(k)])
        w[:k] = torch.from_numpy(xs)
    return w

m = load_model("models/candidate-bolt-2.5m").float().train()
opt = torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.01)
task = make_task("ETTh2", C, H, max_eval_windows=2048)
ad = get_adapter(m)
def val():
    m.eval()
    with torch.no_grad():
        x, y = task.val.batch(np.arange(len(task.val)))
        p = torch.cat([ad.predict(m, x[i:i+512], H) for i in range(0, len(x), 512)])
    m.train()
    return float(((p - y) ** 2).mean())
log = open(out / "log.jsonl", "a")
rec = {"step": 0, "probe": seasonal_probe(m), "etth2_val_mse": val()}
print(rec, flush=True); log.write(json.dumps(rec) + "\n")
t0 = time.time()
for s in range(1, steps + 1):
    w = sample(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(context=w[:, :C], target=w[:, C:]).loss
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    if s % 250 == 0 or s == steps:
        rec = {"step": s, "loss": float(loss.detach()), "probe": seasonal_probe(m), "etth2_val_mse": val(), "wall": time.time() - t0}
        print(rec, flush=True); log.write(json.dumps(rec) + "\n"); log.flush()
        torch.save(m.state_dict(), out / "state.pt")
