"""Where models come from: the embedded default, a tsprune save, a local checkpoint, or a hub name.

Stage of the flow: the start - hands a model (an instance of the real class of its package) to the
adapter. Everything here works offline except hub names, which say clearly when the hub is out of
reach.
"""
from __future__ import annotations

import json
import pathlib
import re

from torch import nn

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent / "default"


# architectures (config.json "architectures") of checkpoints tsprune loads, -> registry entry
_HF_ARCHS = {
    "ChronosBoltModelForForecasting": "chronos.chronos_bolt:ChronosBoltModelForForecasting",
    "T5ForConditionalGeneration": "transformers.models.t5.modeling_t5:T5ForConditionalGeneration",
    "PatchTSTForPrediction": "transformers.models.patchtst.modeling_patchtst:PatchTSTForPrediction",
    "TimesFmModelForPrediction": "transformers.models.timesfm.modeling_timesfm:TimesFmModelForPrediction",
    "TimesFm2_5ModelForPrediction":
        "transformers.models.timesfm2_5.modeling_timesfm2_5:TimesFm2_5ModelForPrediction",
    "Chronos2Model": "chronos.chronos2.model:Chronos2Model",
    "PatchTSMixerForPrediction":
        "transformers.models.patchtsmixer.modeling_patchtsmixer:PatchTSMixerForPrediction",
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _from_hf_dir(d: pathlib.Path, trust_remote_code: bool = False) -> nn.Module:
    """A local HF checkpoint of a supported family. The class comes from the fixed table above
    (never ``getattr(transformers, name)`` of a name from the file); ``trust_remote_code`` is passed
    to ``from_pretrained`` as given (False unless the caller asks)."""
    from .adapters import resolve_model_class

    f = d / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_model: corrupt JSON in {f}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"load_model: {f} must be a JSON object, got {type(cfg).__name__}")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise ValueError(f"load_model: {f} field 'architectures' must be a list, got {type(archs).__name__}")
    arch = archs[0] if archs else None
    if arch not in _HF_ARCHS and isinstance(cfg.get("chronos_config"), dict):  # older Chronos configs
        bolt = (isinstance(arch, str) and "Bolt" in arch) or "input_patch_size" in cfg["chronos_config"]
        arch = "ChronosBoltModelForForecasting" if bolt else "T5ForConditionalGeneration"
    if not isinstance(arch, str) or arch not in _HF_ARCHS:
        raise ValueError(
            f"load_model: {f} field 'architectures': {arch!r} is not an architecture tsprune supports "
            f"(supported: {', '.join(_HF_ARCHS)})"
        )
    cls = resolve_model_class(_HF_ARCHS[arch])
    if cls is None:
        raise ValueError(f"load_model: {f} names {arch}, whose package is not installed")
    return cls.from_pretrained(str(d), trust_remote_code=trust_remote_code)


def load_model(spec: str = "default", *, trust_remote_code: bool = False) -> nn.Module:
    """``default`` | a directory written by ``tsprune.save_pruned`` | a local HF checkpoint directory
    (config.json + weights: Chronos-Bolt, Chronos, Chronos-2, TimesFM 2.0 / 2.5, PatchTST,
    PatchTSMixer) | a hub name ``org/name`` such as ``amazon/chronos-bolt-small`` (needs the hub to
    be reachable).

    A spec that is not an existing path and not of the form ``org/name`` raises FileNotFoundError
    ("no such model directory") without contacting the hub. Only the supported architectures load;
    ``trust_remote_code`` is never enabled unless passed as True."""
    from .checkpoint import load_pruned

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"load_model: model must be a non-empty string, got {spec!r}")
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
            return _from_hf_dir(p, trust_remote_code).eval()
        raise FileNotFoundError(f"load_model: {p} has neither meta.json (tsprune save) nor config.json (checkpoint)")
    if p.exists():
        raise FileNotFoundError(f"load_model: {spec} is not a model directory (it is a file)")
    local_parent = p.parent != pathlib.Path(".") and p.parent.exists()  # e.g. runs/missing
    if not _HUB_NAME.match(spec) or spec.startswith((".", "/", "~")) or local_parent:
        raise FileNotFoundError(f"load_model: no such model directory: {spec} (hub names have the form org/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec)
    except Exception as e:  # offline: connection errors, or LocalEntryNotFoundError
        raise RuntimeError(
            f"load_model: {spec!r} is not a local directory and could not be fetched from the Hugging "
            f"Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without "
            f"network access, download the checkpoint on a connected machine and pass its local "
            f"directory instead."
        ) from None
    return _from_hf_dir(pathlib.Path(local), trust_remote_code).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
