"""tsprune: prune-then-finetune for time series foundation models (see SPEC in docs)."""
__version__ = "0.1.0"
