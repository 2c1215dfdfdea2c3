"""One adapter per model family; ``get_adapter(model)`` picks it from the model's class.

The registry of supported model classes (what ``load_pruned`` and ``load_model`` accept) is fixed:
each registered Adapter subclass declares ``model_classes``, "module:QualName" strings of the
classes it handles (the built-in families get theirs from ``_BUILTIN_MODEL_CLASSES`` when they do
not declare them). Nothing here ever imports a name read from a file: ``resolve_model_class`` only
imports a string that is in this registry.
"""
from __future__ import annotations

from .base import Adapter, MaskSpec, Plan, Site, ZeroLinear

_REGISTRY: list[type[Adapter]] = []

# family -> the model classes tsprune loads for it ("module:QualName", imported lazily).
_BUILTIN_MODEL_CLASSES: dict[str, tuple[str, ...]] = {
    "chronos-bolt": ("chronos.chronos_bolt:ChronosBoltModelForForecasting",),
    "chronos": ("transformers.models.t5.modeling_t5:T5ForConditionalGeneration",),
    "patchtst": ("transformers.models.patchtst.modeling_patchtst:PatchTSTForPrediction",),
    "timesfm": ("transformers.models.timesfm.modeling_timesfm:TimesFmModelForPrediction",),
    "timesfm2.5": ("transformers.models.timesfm2_5.modeling_timesfm2_5:TimesFm2_5ModelForPrediction",),
}


def register(cls: type[Adapter]) -> type[Adapter]:
    if not getattr(cls, "model_classes", ()):
        cls.model_classes = _BUILTIN_MODEL_CLASSES.get(cls.family, ())
    for q in cls.model_classes:
        if not isinstance(q, str) or q.count(":") != 1:
            raise TypeError(f"register({cls.__name__}): model_classes entries must be 'module:QualName', got {q!r}")
    if cls not in _REGISTRY:
        _REGISTRY.append(cls)
    return cls


def get_adapter(model, **kwargs) -> Adapter:
    _load_builtin()
    for cls in _REGISTRY:
        if cls.matches(model):
            return cls(model, **kwargs)
    known = ", ".join(c.family for c in _REGISTRY) or "none"
    raise TypeError(f"no tsprune adapter for model class {type(model).__name__} (known families: {known})")


def supported_model_classes() -> dict[str, str]:
    """"module:QualName" -> family, for every registered adapter (the fixed registry)."""
    _load_builtin()
    out: dict[str, str] = {}
    for cls in _REGISTRY:
        for q in cls.model_classes:
            out.setdefault(q, cls.family)
    return out


def resolve_model_class(qualname: str):
    """The class named by ``qualname`` if it is in the registry (and its package is installed),
    else None. Imports only registry entries, never an arbitrary name."""
    import importlib

    if not isinstance(qualname, str) or qualname not in supported_model_classes():
        return None
    mod, _, name = qualname.partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def model_class_name(model_or_cls) -> str | None:
    """The registry entry ("module:QualName") of a model's exact class, or None when unsupported."""
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    for q in supported_model_classes():
        if resolve_model_class(q) is cls:
            return q
    return None


def _load_builtin() -> None:
    # Imported lazily so that `import tsprune` does not import every model package.
    import importlib

    for mod in ("t5", "patchtst", "timesfm", "chronos2", "patchtsmixer"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # the adapter file or its model package is absent
            if e.name and (e.name.endswith(mod) or not e.name.startswith("tsprune")):
                continue
            raise


__all__ = [
    "Adapter", "MaskSpec", "Plan", "Site", "ZeroLinear", "get_adapter", "model_class_name", "register",
    "resolve_model_class", "supported_model_classes",
]
