"""Where models come from: the embedded default, a tsprune save, a local checkpoint, or a hub name.

Stage of the flow: the start - hands a model (an instance of the real class of its package) to the
adapter. Everything here works offline except hub names, which say clearly when the hub is out of
reach.
"""
from __future__ import annotations

import json
import pathlib

from torch import nn

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent / "default"


def _from_hf_dir(d: pathlib.Path) -> nn.Module:
    cfg = json.loads((d / "config.json").read_text())
    if "chronos_config" in cfg:
        from chronos.chronos_bolt import ChronosBoltModelForForecasting

        arch = (cfg.get("architectures") or [""])[0]
        if "Bolt" in arch or "input_patch_size" in cfg["chronos_config"]:
            return ChronosBoltModelForForecasting.from_pretrained(str(d))
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(str(d))  # classic Chronos (T5)
    import transformers

    arch = (cfg.get("architectures") or [None])[0]
    if arch and hasattr(transformers, arch):
        return getattr(transformers, arch).from_pretrained(str(d))
    raise ValueError(f"load_model: {d / 'config.json'} names no architecture tsprune knows ({arch!r})")


def load_model(spec: str = "default") -> nn.Module:
    """``default`` | a directory written by ``tsprune.save_pruned`` | a local HF checkpoint directory
    (config.json + weights: Chronos-Bolt, Chronos, TimesFM, PatchTST) | a hub name such as
    ``amazon/chronos-bolt-small`` (needs the hub to be reachable)."""
    from .plan import load_pruned

    if spec == "default":
        if not (DEFAULT_DIR / "meta.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_DIR}; recreate it with "
                f"`python -m tsprune.pretrain --out {DEFAULT_DIR}`"
            )
        return load_pruned(DEFAULT_DIR)
    p = pathlib.Path(spec).expanduser()
    if p.is_dir():
        if (p / "meta.json").is_file():
            return load_pruned(p)
        if (p / "config.json").is_file():
            return _from_hf_dir(p).eval()
        raise FileNotFoundError(f"load_model: {p} has neither meta.json (tsprune save) nor config.json (checkpoint)")
    if p.exists() or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"load_model: {spec} is not a model directory")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec)
    except Exception as e:  # offline: connection errors, or LocalEntryNotFoundError
        raise RuntimeError(
            f"load_model: could not fetch {spec!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Without network access, download the "
            f"checkpoint on a connected machine and pass its local directory instead."
        ) from None
    return _from_hf_dir(pathlib.Path(local)).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
