"""Compatibility shim: synthetic series moved to :mod:`tsprune.data.synthetic` and the bundled task
to :mod:`tsprune.data.tasks`. ``from tsprune.synthetic import X`` keeps working for every former name."""
from .data.synthetic import SEASONAL_PERIODS, _ar1, _one_series, generate  # noqa: F401
from .data.tasks import synthetic_task  # noqa: F401

__all__ = ["generate", "synthetic_task", "SEASONAL_PERIODS"]
