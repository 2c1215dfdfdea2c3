"""Compatibility shim: the field-by-field checks of a saved directory moved to
:mod:`tsprune.checkpoint_check` (they check meta.json as well as plan.json, for ``load_pruned``)."""
from .checkpoint_check import META_FIELDS, Where, check_meta_types, check_plan  # noqa: F401
