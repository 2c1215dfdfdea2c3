"""Make ``tsprune`` (python/) and the repo root importable without installing the package."""
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (_ROOT, _ROOT / "python"):  # python/ ends up first
    _s = str(_p)
    if _s in sys.path:
        sys.path.remove(_s)
    sys.path.insert(0, _s)
