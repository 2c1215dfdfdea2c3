"""One adapter per model family; ``get_adapter(model)`` picks it from the model's class."""
from __future__ import annotations

from .base import Adapter, MaskSpec, Plan, Site, ZeroLinear

_REGISTRY: list[type[Adapter]] = []


def register(cls: type[Adapter]) -> type[Adapter]:
    _REGISTRY.append(cls)
    return cls


def get_adapter(model, **kwargs) -> Adapter:
    _load_builtin()
    for cls in _REGISTRY:
        if cls.matches(model):
            return cls(model, **kwargs)
    known = ", ".join(c.family for c in _REGISTRY) or "none"
    raise TypeError(f"no tsprune adapter for model class {type(model).__name__} (known families: {known})")


def _load_builtin() -> None:
    # Imported lazily so that `import tsprune` does not import every model package.
    import importlib

    for mod in ("t5", "patchtst", "timesfm"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # the adapter file or its model package is absent
            if e.name and (e.name.endswith(mod) or not e.name.startswith("tsprune")):
                continue
            raise


__all__ = ["Adapter", "MaskSpec", "Plan", "Site", "ZeroLinear", "get_adapter", "register"]
