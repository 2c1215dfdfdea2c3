"""Forecast errors on scaled values: MSE and MAE, summed in float64.

Stage of the flow: (forecast, target) pairs of any shape, numpy or torch -> **mse / mae**, or
their running sums over batches in a :class:`MetricAccumulator` (exact whatever the batching).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["mse", "mae", "MetricAccumulator"]


def _pair_f64(pred: Any, target: Any) -> tuple[Any, Any]:
    if isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor):
        p = torch.as_tensor(pred).detach()
        t = torch.as_tensor(target).detach()
        dev = p.device if p.device.type != "cpu" else t.device
        p, t = p.to(dev, torch.float64), t.to(dev, torch.float64)
    else:
        p = np.asarray(pred, dtype=np.float64)
        t = np.asarray(target, dtype=np.float64)
    if tuple(p.shape) != tuple(t.shape):
        raise ValueError(f"pred shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    return p, t


def _sums(pred: Any, target: Any) -> tuple[float, float, int]:
    p, t = _pair_f64(pred, target)
    d = p - t
    if isinstance(d, torch.Tensor):
        return float((d * d).sum().item()), float(d.abs().sum().item()), int(d.numel())
    return float(np.sum(d * d)), float(np.sum(np.abs(d))), int(d.size)


def mse(pred: Any, target: Any) -> float:
    """Mean squared error over all elements, computed in float64."""
    s2, _, n = _sums(pred, target)
    if n == 0:
        raise ValueError("mse of empty arrays")
    return s2 / n


def mae(pred: Any, target: Any) -> float:
    """Mean absolute error over all elements, computed in float64."""
    _, s1, n = _sums(pred, target)
    if n == 0:
        raise ValueError("mae of empty arrays")
    return s1 / n


class MetricAccumulator:
    """Streaming MSE / MAE over batches; sums kept in float64 (exact regardless of batching)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sq = 0.0
        self.abs = 0.0
        self.n = 0

    def update(self, pred: Any, target: Any) -> "MetricAccumulator":
        s2, s1, n = _sums(pred, target)
        self.sq += s2
        self.abs += s1
        self.n += n
        return self

    def result(self) -> dict[str, float | int]:
        if self.n == 0:
            return {"mse": math.nan, "mae": math.nan, "n": 0}
        return {"mse": self.sq / self.n, "mae": self.abs / self.n, "n": self.n}
