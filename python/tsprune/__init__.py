"""tsprune: prune-then-finetune for time series foundation models.

Public API (stable contract):

    pruner = tsprune.Pruner(model, criterion="taylor", ema=0.5, block=1, heads=False, ...)
    (criterion: a registered name or a tsprune.Criterion object; tsprune.register_criterion)
    pruner.attach(); pruner.masks; pruner.step(n); small = pruner.repack()
    tsprune.save_pruned(model, directory); tsprune.load_pruned(directory)

Heavy imports (transformers, chronos) happen only when a model family's adapter is needed.
"""
__version__ = "0.1.0"

from .checkpoint import load_pruned, save_pruned  # noqa: E402
from .criteria import Criterion, register_criterion  # noqa: E402
from .pruner import Pruner  # noqa: E402

__all__ = ["Pruner", "Criterion", "register_criterion", "load_pruned", "save_pruned", "__version__"]
