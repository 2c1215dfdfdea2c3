"""Shared helpers of the benchmarks: timing (median after warm-up, cases interleaved so they see the
same machine state), the machine description, and writing a result file under benchmarks/results/."""
from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    d = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name()
    try:
        d["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, cwd=RESULTS.parent).stdout.strip()
    except OSError:
        pass
    return d


def bench(cases: dict, warmup: int = 2, reps: int = 7, setup: dict | None = None) -> dict:
    """Median wall time (ms) of each zero-argument callable, runs interleaved round-robin.
    ``setup[k]`` (optional, untimed) runs before every call of case k, e.g.
    ``lambda: K.set_backend("cpp")``: switching a backend is not part of what is measured."""
    setup = setup or {}
    for k, f in cases.items():
        for _ in range(warmup):
            if k in setup:
                setup[k]()
            f()
    times = {k: [] for k in cases}
    for _ in range(reps):
        for k, f in cases.items():
            if k in setup:
                setup[k]()
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "reps": reps} for k, v in times.items()}


def write(name: str, payload: dict) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    os.replace(tmp, path)
    return path
