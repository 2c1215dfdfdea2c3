"""The progress journal of one ``tsprune run``: what lets a run of hours survive being stopped.

A run is a fixed sequence of stages (zero-shot test, baselines, every fine-tune of the grid, every
calibration, every seed ...). Each stage is started from the same seed (``tsprune run`` seeds
before each one; fine-tunes and calibrations seed themselves again), so its result depends on its
inputs only, never on what ran before it in the same process: a stage finished in an earlier
process can be read back instead of recomputed, and the finished run is the same run.

Layout under ``<out>/progress/`` (removed when the run has written its results):

- ``run.json``: what the results depend on (every option except where the output goes and progress
  bars; the torch thread count, which changes float sums; the versions of tsprune, torch,
  transformers and chronos-forecasting; the model's sha256; the task's windows and series sha256). ``--resume`` refuses a journal whose
  run.json differs, naming the options.
- ``<stage>.json``: one record per finished stage, written atomically after everything the stage
  saves, so a record exists only for a stage that finished.
- ``<name>.pt`` (``torch.save`` of ``{"tag", "state"}``, read back with ``weights_only=True``) and
  ``<name>/`` (a ``save_pruned`` directory, its tag in ``<name>.tag.json`` written after it): the
  models later stages need (the current best candidate of a grid, each calibration's pruned model).
  The tag names the stage that produced them; a model whose tag is not the one asked for is not
  used (the stage that made it is run again).

Nothing in the journal is executed: records are JSON, tensors are loaded without pickled code.
"""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
import shutil

import torch
from torch import nn

from .checkpoint import atomic_json, atomic_write, json_text

__all__ = ["Journal", "model_sha256", "cpu_name"]


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo, else platform's guess): each stage record names where it
    was made, since the float results of a long training differ between CPU models."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def model_sha256(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of ``model.state_dict()``."""
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif not (a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))):
            out.append(f"{prefix}{k} {a!r} (now {b!r})")
    return out


class Journal:
    """Records of finished stages under ``directory``; see the module docstring.

    enabled=False: a journal that keeps nothing (``get`` returns None, ``put`` returns its record):
    the same code path runs without progress files (used under torchrun, where only rank 0 reaches
    the stages)."""

    def __init__(self, directory, run: dict, *, resume: bool, enabled: bool = True, log=None):
        self.dir = pathlib.Path(directory)
        self.enabled = enabled
        self.log = log
        self.resumed: list[str] = []
        if not enabled:
            return
        run = json.loads(json_text(run))  # compare what a reread would hold
        spec = self.dir / "run.json"
        self.refuse_unfinished(self.dir, resume)
        if resume and not spec.exists() and self.dir.exists() and self.finished():
            raise ValueError(f"--resume: {self.dir} holds stage records but no run.json (what they were run "
                             f"with is unknown): remove {self.dir} to start over")
        if resume and spec.exists():
            old = json.loads(spec.read_text())
            diff = _differences(old, run)
            if diff:
                raise ValueError(f"--resume: {self.dir} was started with different settings: {'; '.join(diff[:6])}"
                                 f"{' ...' if len(diff) > 6 else ''} (remove it to start over)")
            if log:
                log(f"resume: {len(self.finished())} finished stage(s) in {self.dir} are read back, not re-run")
        else:
            if resume and log:
                log(f"resume: no journal in {self.dir}; starting from the beginning")
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_json(spec, run)

    @staticmethod
    def refuse_unfinished(directory, resume: bool) -> None:
        """ValueError if ``directory`` holds a journal and ``resume`` is off (an unfinished run is
        never overwritten silently). Cheap: callers run it before loading anything."""
        d = pathlib.Path(directory)
        if d.exists() and not resume:
            n = len(Journal._stages(d))
            raise ValueError(f"--out {d.parent}: holds an unfinished run ({d}, {n} stage(s) done): "
                             f"add --resume to continue it, or remove {d} to start over")

    @staticmethod
    def _stages(d: pathlib.Path) -> list[str]:
        return sorted(p.stem for p in d.glob("*.json") if p.name != "run.json" and not p.name.endswith(".tag.json"))

    def finished(self) -> list[str]:
        """Names of the stages with a record."""
        return self._stages(self.dir)

    # --- records ---------------------------------------------------------------------------------
    def get(self, stage: str) -> dict | None:
        """The record of a finished stage, or None (not finished, or the journal is off)."""
        if not self.enabled:
            return None
        p = self.dir / f"{stage}.json"
        if not p.exists():
            return None
        self.resumed.append(stage)
        return json.loads(p.read_text())

    def put(self, stage: str, record: dict) -> dict:
        """Mark ``stage`` finished with ``record`` (JSON); returns the record as a reread gives it,
        so a fresh run and a resumed one continue from the same values."""
        text = json_text(record)
        if self.enabled:
            atomic_write(self.dir / f"{stage}.json", lambda f: f.write(text.encode()))
        return json.loads(text)

    # --- models ----------------------------------------------------------------------------------
    def save_state(self, name: str, model: nn.Module, tag: str) -> None:
        """The weights of ``model`` (same architecture as what ``load_state`` fills) under ``tag``."""
        if self.enabled:
            sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            atomic_write(self.dir / f"{name}.pt", lambda f: torch.save({"tag": tag, "state": sd}, f))

    def load_state(self, name: str, model: nn.Module, tag: str) -> bool:
        """Fill ``model`` with the weights saved under ``name`` if their tag is ``tag``; False
        otherwise (missing, another stage's, or unreadable: the caller runs its stage again)."""
        p = self.dir / f"{name}.pt"
        if not (self.enabled and p.exists()):
            return False
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or blob.get("tag") != tag:
                return False
            model.load_state_dict(blob["state"], strict=True)
        except Exception as e:  # noqa: BLE001 - a damaged file means: run the stage again
            self._warn(f"{p} unreadable ({type(e).__name__}: {e}); its stage runs again")
            return False
        return True

    def save_pruned(self, name: str, model: nn.Module, tag: str) -> None:
        """A pruned model (``save_pruned`` format, every tensor in its own dtype) under ``tag``."""
        if not self.enabled:
            return
        from .checkpoint import save_pruned

        (self.dir / f"{name}.tag.json").unlink(missing_ok=True)  # no tag names a model being replaced
        save_pruned(model, self.dir / name)
        atomic_json(self.dir / f"{name}.tag.json", {"tag": tag})  # after the model: it names it

    def load_pruned(self, name: str, tag: str) -> nn.Module | None:
        """The pruned model saved under ``name`` if its tag is ``tag``; None otherwise."""
        t = self.dir / f"{name}.tag.json"
        if not (self.enabled and t.exists()) or json.loads(t.read_text()).get("tag") != tag:
            return None
        from .checkpoint import load_pruned

        try:
            return load_pruned(self.dir / name, dtype=None)
        except Exception as e:  # noqa: BLE001 - a damaged save means: run the stage again
            self._warn(f"{self.dir / name} unreadable ({type(e).__name__}: {e}); its stage runs again")
            return None

    def drop(self, name: str) -> None:
        """Remove a saved model no later stage needs (its record stays)."""
        if self.enabled:
            (self.dir / f"{name}.tag.json").unlink(missing_ok=True)
            shutil.rmtree(self.dir / name, ignore_errors=True)
            (self.dir / f"{name}.pt").unlink(missing_ok=True)

    def forget(self, stage: str) -> None:
        """Delete the record of ``stage`` (read back, but what it saved is lost or damaged), so that
        it runs again; it is no longer reported as resumed."""
        if self.enabled:
            (self.dir / f"{stage}.json").unlink(missing_ok=True)
        self.resumed = [s for s in self.resumed if s != stage]

    def _warn(self, msg: str) -> None:
        if self.log:
            self.log(f"resume: {msg}")

    def path(self, name: str) -> pathlib.Path:
        return self.dir / name

    def finish(self) -> None:
        """The run wrote its results: the journal is no longer needed."""
        if self.enabled and self.dir.exists():
            shutil.rmtree(self.dir)
