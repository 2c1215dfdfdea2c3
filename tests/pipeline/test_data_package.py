"""The data package and the split of plan.py: every former import still works, the modules of
tsprune.data import one way only (no circle), and there is one batching path."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tsprune

PKG = pathlib.Path(tsprune.__file__).resolve().parent

# every name defined by the former python/tsprune/data.py (public and private)
OLD_DATA_NAMES = (
    "KNOWN_URLS", "resolve_csv", "search_dirs", "cache_dir", "load_csv", "split_borders", "StandardScaler",
    "WindowDataset", "ForecastTask", "make_task", "task_from_array", "mse", "mae", "MetricAccumulator",
    "infer_frequency", "ENV_DATA_DIR", "ENV_NO_DOWNLOAD", "DOWNLOAD_TIMEOUT_S", "_ETT_BASE", "_ETTH_MONTH",
    "_ETTM_MONTH", "_repo_root", "_dataset_key", "_find_in", "_download", "_DATE_NAMES", "_mostly_numeric",
    "_pair_f64", "_sums", "urllib",
)
OLD_SYNTHETIC_NAMES = ("generate", "synthetic_task", "SEASONAL_PERIODS", "_ar1", "_one_series")
OLD_PLAN_NAMES = (
    "fold_masks_", "repack_model", "load_exact", "save_pruned", "load_pruned", "Plan", "Adapter", "Site",
    "FORMAT_VERSION", "_index", "_tied_slots", "_sha256", "_umask", "_pid_alive", "_remove_stale", "_DirLock",
    "_stored_tensors", "_SAFE_DTYPE", "_STORAGE_DTYPES", "_FILES", "_HASHED", "_STALE_AGE_S", "_LEGACY_AGE_S",
    "os",
)
# module -> the modules of the package it may import (the one-way order of the package docstring)
ALLOWED = {
    "sources": set(),
    "synthetic": set(),
    "protocol": {"sources"},
    "windows": set(),
    "metrics": set(),
    "tasks": {"sources", "synthetic", "protocol", "windows"},
}


def test_every_former_data_name_is_importable_from_tsprune_data():
    import tsprune.data as D

    for name in OLD_DATA_NAMES:
        assert getattr(D, name) is not None, name
    ns: dict = {}
    exec("from tsprune.data import *", ns)
    assert set(D.__all__) <= set(ns) and {"batch_indices", "synthetic_task"} <= set(ns)
    assert set(OLD_DATA_NAMES) <= set(dir(D))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        D.nope  # noqa: B018
    # one object each, wherever it is imported from
    from tsprune.data.metrics import MetricAccumulator
    from tsprune.data.tasks import ForecastTask, synthetic_task
    from tsprune.data.windows import WindowDataset, batch_indices

    assert D.MetricAccumulator is MetricAccumulator and D.ForecastTask is ForecastTask
    assert D.WindowDataset is WindowDataset and D.synthetic_task is synthetic_task
    import tsprune.train

    assert tsprune.train.batch_indices is batch_indices
    # the repository root is still found from the moved file (../shared/data lookup)
    assert (D._repo_root() / "python" / "tsprune" / "data" / "sources.py").is_file()


def test_former_synthetic_plan_and_plan_check_names_still_import():
    import tsprune.checkpoint
    import tsprune.data.synthetic
    import tsprune.plan
    import tsprune.plan_check
    import tsprune.repack
    import tsprune.synthetic

    for name in OLD_SYNTHETIC_NAMES:
        assert getattr(tsprune.synthetic, name) is not None, name
    assert tsprune.synthetic.generate is tsprune.data.synthetic.generate
    for name in OLD_PLAN_NAMES:
        assert getattr(tsprune.plan, name) is not None, name
    assert tsprune.plan.repack_model is tsprune.repack.repack_model
    assert tsprune.plan.save_pruned is tsprune.checkpoint.save_pruned is tsprune.save_pruned
    assert tsprune.plan.load_pruned is tsprune.checkpoint.load_pruned is tsprune.load_pruned
    from tsprune.checkpoint_check import check_plan

    assert tsprune.plan_check.check_plan is check_plan
    assert {"Where", "check_meta_types", "check_plan", "META_FIELDS"} <= set(vars(tsprune.plan_check))


def _package_imports(module: str) -> set[str]:
    """The tsprune.data modules that ``tsprune/data/<module>.py`` imports (anywhere in the file)."""
    tree = ast.parse((PKG / "data" / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsprune"):
            raise AssertionError(f"data/{module}.py imports {node.module} absolutely")
    return out


def test_data_modules_import_one_way():
    assert set(ALLOWED) == {p.stem for p in (PKG / "data").glob("*.py")} - {"__init__"}
    for module, allowed in ALLOWED.items():
        got = _package_imports(module)
        assert got <= allowed, f"data/{module}.py imports {sorted(got - allowed)}"


def test_importing_one_source_loads_no_other_part_of_the_package():
    code = (
        "import sys\n"
        "import tsprune.data.sources, tsprune.data.synthetic\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('tsprune.data'))\n"
        "assert loaded == ['tsprune.data', 'tsprune.data.sources', 'tsprune.data.synthetic'], loaded\n"
        "from tsprune.data import split_borders\n"
        "assert 'tsprune.data.windows' not in sys.modules and 'tsprune.data.tasks' not in sys.modules\n"
        "import tsprune.synthetic\n"  # the shim builds tasks, which loads windows: never the reverse
        "assert 'tsprune.data.tasks' in sys.modules\n"
    )
    paths = [str(PKG.parent), str(PKG.parents[1])]
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = {paths!r}\n" + code],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_one_batching_path_same_batches_for_a_seed():
    from tsprune.data import WindowDataset, batch_indices

    ds = WindowDataset(np.random.default_rng(0).standard_normal((60, 3)).astype(np.float32), 8, 4)
    n = len(ds)
    for shuffle, seed, bs in ((False, 0, 7), (True, 0, 7), (True, 1003, 16), (True, 5, n + 3)):
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        want = [order[a : a + bs] for a in range(0, n, bs)]
        got = list(batch_indices(n, bs, shuffle, seed))
        assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
        for (c, t), idx in zip(ds.iter_batches(bs, shuffle=shuffle, seed=seed), want):
            c2, t2 = ds.batch(idx)
            assert c.dtype == c2.dtype and c.equal(c2) and t.equal(t2)
    assert [len(i) for i in batch_indices(10, 4, False, drop_last=True)] == [4, 4]
    assert [len(i) for i in batch_indices(10, 4, False)] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        next(batch_indices(10, 0, False))


def test_shims_are_thin():
    for shim in ("synthetic.py", "plan.py", "plan_check.py"):
        tree = ast.parse((PKG / shim).read_text())
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defs, f"{shim} defines {[d.name for d in defs]}: a shim only re-exports"
