"""The saved form of a (pruned) model: save_pruned / load_pruned, files and safety checks.

Stage of the flow: a model (with its Plan as ``model.tsprune_plan``) -> **a directory** ->
the same model again, needing neither the calibration run nor the masks. Saving is atomic and
locked; loading runs no code named by the files and checks every field
(:mod:`tsprune.checkpoint_check`), checksum, tensor name and shape before any weight is used.
"""
from __future__ import annotations

import os
import pathlib
import stat

import torch
from torch import nn

from .adapters.base import Plan
from .atomic import _umask, atomic_json, atomic_write, json_text  # noqa: F401 - re-exported
from .repack import load_exact

__all__ = ["save_pruned", "load_pruned", "FORMAT_VERSION"]

# A saved directory: model.safetensors (weights; tied tensors stored once), config.json (the model's
# HF config), plan.json (every per-layer shape, Plan.to_json) and meta.json (written last: format,
# versions, model class, family, aliases of tied tensors, storage dtype and the sha256 of the other
# three files). Format 2 adds the checksums and the storage dtype; format 1 (no checksums) still
# loads, with one warning that the directory is unverified.

FORMAT_VERSION = 2
_FILES = ("meta.json", "config.json", "plan.json", "model.safetensors")
_HASHED = ("plan.json", "config.json", "model.safetensors")
_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "float64": torch.float64}
_STALE_AGE_S = 24 * 3600  # a temp dir whose writer cannot be identified is removed after this long
_LEGACY_AGE_S = 600  # a pre-format-2 temp dir (no writer PID in its name) after this long


def _sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user's) / not a pid we can judge: keep
    return True


def _remove_stale(parent: pathlib.Path, name: str) -> list[str]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` left in ``parent`` by writers that were killed: those
    whose writer PID (in the name) is not running on this machine, or, for names without a PID,
    older than a safe age. A live writer's directories are never touched. Returns what was removed."""
    import re
    import shutil
    import time

    pat = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)?")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        m = pat.match(e.name)
        if not m:
            continue
        pid = int(m.group(2)) if m.group(2) and e.name[m.end():m.end() + 1] in ("-", "") else None
        try:
            age = now - e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if pid == os.getpid() or (pid is not None and _pid_alive(pid) and age < _STALE_AGE_S):
            continue
        if pid is None and age < _LEGACY_AGE_S:
            continue
        if e.is_symlink() or not e.is_dir(follow_symlinks=False):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.name)
    return removed


class _DirLock:
    """Exclusive lock on ``parent/.NAME.lock`` (fcntl.flock: between processes and between threads,
    each holding its own open file). Without fcntl (not POSIX) saves into one directory are not
    serialised: tsprune's supported platforms are POSIX."""

    def __init__(self, parent: pathlib.Path, name: str):
        self.path = parent / f".{name}.lock"
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def _stored_tensors(model: nn.Module, dtype: torch.dtype | None):
    """(tensors to write, aliases): tied tensors (same storage, dtype, shape, stride) stored once."""
    tensors, aliases, seen = {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        t = v.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous().cpu()
    return tensors, aliases


def save_pruned(
    model: nn.Module,
    directory,
    plan: Plan | None = None,
    extra: dict | None = None,
    *,
    storage_dtype: torch.dtype | None = None,
) -> None:
    """Write ``model`` (pruned or not) to ``directory`` atomically: safetensors weights, the model's
    config, the JSON plan with every per-layer shape, and meta.json (model class from tsprune's
    registry, tied tensors, storage dtype, sha256 of the other files).

    storage_dtype: None keeps each tensor's dtype; torch.float16 / torch.bfloat16 / torch.float32
    stores every floating tensor in that dtype (``load_pruned`` casts back, to float32 by default).

    The directory is assembled under ``.NAME.tmp-PID-*`` beside it and swapped in under a lock
    (``.NAME.lock``): concurrent writers each succeed and the last complete one wins. Temp
    directories left by killed writers (dead PID) are removed first. Files follow the umask."""
    import json
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from . import __version__
    from .adapters import get_adapter, model_class_name, supported_model_classes

    if storage_dtype is not None and storage_dtype not in _STORAGE_DTYPES.values():
        raise ValueError(
            f"save_pruned: storage_dtype must be None or one of torch.{', torch.'.join(_STORAGE_DTYPES)}, "
            f"got {storage_dtype!r}"
        )
    plan = plan or getattr(model, "tsprune_plan", None)
    if plan is None:
        plan = Plan(family=get_adapter(model).family)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"save_pruned: {type(model).__name__} has no HF-style .config to save")
    for path, spec in plan.linears.items():  # the plan must describe this model (else it cannot load)
        try:
            lin = model.get_submodule(path)
            ok = (lin.in_features, lin.out_features) == (spec["in"], spec["out"])
        except (AttributeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"save_pruned: the plan's linears.{path} does not match the model's module; "
                             "pass the plan returned with this model")
    model_class = model_class_name(model)
    if model_class is None:
        raise TypeError(
            f"save_pruned: {type(model).__module__}.{type(model).__qualname__} is not a model class "
            f"tsprune can load again (supported: {', '.join(supported_model_classes())})"
        )
    out = pathlib.Path(directory)
    if out.name in ("", ".", ".."):
        raise ValueError(f"save_pruned: {directory!r} does not name a directory to create")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:  # one stat: exists() then is_dir() races a concurrent writer swapping `out` (between them
        # `out` can be briefly absent, which would read as "exists and is not a directory")
        st = os.stat(out)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise FileExistsError(f"save_pruned: {out} exists and is not a directory")
    _remove_stale(out.parent, out.name)
    tensors, aliases = _stored_tensors(model, storage_dtype)
    meta = {
        "format": "tsprune-pruned",
        "format_version": FORMAT_VERSION,
        "tsprune_version": __version__,
        "model_class": model_class,
        "config_class": f"{type(config).__module__}:{type(config).__qualname__}",
        "family": plan.family,
        "aliases": aliases,
        "n_params": sum(p.numel() for p in model.parameters()),
        "storage_dtype": None if storage_dtype is None else str(storage_dtype).removeprefix("torch."),
        "sha256": {},
        "extra": extra or {},
    }
    umask = _umask()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a saved model is an ordinary directory
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))
        (tmp / "plan.json").write_text(json.dumps(plan.to_json(), indent=1))
        meta["sha256"] = {f: _sha256(tmp / f) for f in _HASHED}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks completeness
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        with _DirLock(out.parent, out.name):
            if out.is_dir() and not (out / "meta.json").is_file() and any(out.iterdir()):
                raise FileExistsError(
                    f"save_pruned: {out} exists and is not a tsprune save (no meta.json); "
                    "refusing to replace it - choose another directory or remove it"
                )
            if out.is_dir():
                old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
                os.replace(out, old / out.name)  # move the previous save aside, inside a fresh dir
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
            try:
                dfd = os.open(out.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:  # pragma: no cover - directories cannot be fsynced on some systems
                pass
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_pruned(
    directory,
    map_location: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Load a model written by ``save_pruned``: needs no calibration state, no masks, no network,
    and runs no code named by the directory.

    The model class must be in tsprune's registry (``adapters.supported_model_classes()``); its
    config class is the model class's own. Before any weight is used: meta.json and plan.json are
    checked field by field (``checkpoint_check``), the sha256 of plan.json, config.json and
    model.safetensors must match meta.json, and the safetensors keys and shapes must be exactly
    those of the model after the plan (no missing, no extra tensor).

    dtype: floating tensors are cast to it (default float32; None keeps the stored dtype).
    Raises FileNotFoundError / ValueError with one line naming the file and the field. A save of an
    older format without checksums, or from another tsprune version, loads with one warning."""
    import json
    import warnings

    from safetensors import SafetensorError, safe_open

    from . import __version__
    from .adapters import get_adapter, resolve_model_class, supported_model_classes
    from .checkpoint_check import Where, check_meta_types, check_plan

    d = pathlib.Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"load_pruned: {d} is not a directory")
    for f in _FILES:
        if not (d / f).is_file():
            raise FileNotFoundError(f"load_pruned: {d / f} is missing (incomplete or not a tsprune save)")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"load_pruned: dtype must be a floating torch dtype or None, got {dtype!r}")

    def read_json(name):
        try:
            return json.loads((d / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"load_pruned: corrupt JSON in {d / name}: {e}") from None

    wm = Where(d / "meta.json")
    meta = check_meta_types(wm, read_json("meta.json"))
    if meta.get("format") != "tsprune-pruned":
        wm.fail("format", f"{meta.get('format')!r} is not 'tsprune-pruned' (not a tsprune save)")
    fv = meta.get("format_version")
    if not (isinstance(fv, int) and not isinstance(fv, bool)) or fv < 1:
        wm.fail("format_version", f"expected a positive integer, got {fv!r}")
    if fv > FORMAT_VERSION:
        wm.fail("format_version", f"{fv} is newer than this tsprune reads ({FORMAT_VERSION}); upgrade tsprune")
    if meta.get("tsprune_version") != __version__:
        warnings.warn(
            f"load_pruned: {d} was saved by tsprune {meta.get('tsprune_version')!r}, this is {__version__}",
            stacklevel=2,
        )
    supported = supported_model_classes()
    mc = meta.get("model_class")
    model_cls = resolve_model_class(mc) if isinstance(mc, str) else None
    if model_cls is None:
        why = "is not a supported model class" if mc not in supported else "cannot be imported (package missing?)"
        wm.fail("model_class", f"{mc!r} {why} (supported: {', '.join(supported)})")
    family = supported[mc]
    if meta.get("family", family) != family:
        wm.fail("family", f"{meta['family']!r} is not the family of {mc} ({family!r})")
    config_cls = model_cls.config_class
    cq = f"{config_cls.__module__}:{config_cls.__qualname__}"
    if meta.get("config_class", cq) != cq:
        wm.fail("config_class", f"{meta['config_class']!r} is not the config class of {mc} (expected {cq!r})")
    sd_ = meta.get("storage_dtype")
    if sd_ is not None and (not isinstance(sd_, str) or sd_ not in _STORAGE_DTYPES):
        wm.fail("storage_dtype", f"{sd_!r} is not one of {', '.join(_STORAGE_DTYPES)} or null")

    config_d, plan_d = read_json("config.json"), read_json("plan.json")  # syntax only, nothing used yet
    # checksums: before any file's content is used
    sums = meta.get("sha256")
    if sums is None:
        if fv >= 2:
            wm.fail("sha256", "missing (required from format 2 on)")
        warnings.warn(f"load_pruned: {d} is an unverified legacy save (format {fv}, no checksums)", stacklevel=2)
    else:
        if not isinstance(sums, dict) or set(sums) != set(_HASHED):
            wm.fail("sha256", f"expected an object with {', '.join(_HASHED)}")
        for f in _HASHED:
            if _sha256(d / f) != sums[f]:
                raise ValueError(f"load_pruned: {d / f} does not match its sha256 in {d / 'meta.json'} "
                                 "(the file was changed or corrupted after saving)")

    if not isinstance(config_d, dict):
        raise ValueError(f"load_pruned: {d / 'config.json'} must be a JSON object, got {type(config_d).__name__}")
    try:
        config = config_cls.from_dict(config_d)
        model = model_cls(config)
    except Exception as e:  # any failure of the package's own constructors on this config
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"load_pruned: {d / 'config.json'} does not build a {model_cls.__name__}: {type(e).__name__}: {msg}"
        ) from None
    try:
        adapter = get_adapter(model)
    except TypeError as e:
        raise ValueError(f"load_pruned: {d / 'config.json'}: {e}") from None
    if adapter.family != family:
        raise ValueError(f"load_pruned: {d / 'config.json'} builds a {adapter.family!r} model, meta.json "
                         f"field 'model_class' says {family!r}")
    wp = Where(d / "plan.json")
    check_plan(wp, plan_d, model, family)
    plan = Plan.from_json(plan_d)
    try:
        adapter.apply_plan(model, plan)
    except Exception as e:  # should not happen after check_plan; never a traceback from a file
        raise ValueError(f"load_pruned: {d / 'plan.json'} cannot be applied: {type(e).__name__}: {e}") from None

    # the weights file must hold exactly the tensors the restructured model needs
    target = model.state_dict()
    _, want_aliases = _stored_tensors(model, None)
    if meta.get("aliases", {}) != want_aliases:
        bad = sorted(set(meta.get("aliases", {}).items()) ^ set(want_aliases.items()))[:1]
        wm.fail("aliases", f"{meta.get('aliases', {})} differs from the model's tied tensors "
                           f"{want_aliases} (first difference: {bad[0]})")
    st = d / "model.safetensors"
    try:
        with safe_open(str(st), framework="pt") as fh:
            keys = set(fh.keys())
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: fh.get_slice(k).get_dtype() for k in keys}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"load_pruned: corrupt weights file {st}: {str(e).splitlines()[0]}") from None
    need = set(target) - set(want_aliases)
    missing, extra_k = sorted(need - keys), sorted(keys - need)
    if missing:
        raise ValueError(f"load_pruned: {st} lacks tensor {missing[0]!r} that plan.json implies"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra_k:
        raise ValueError(f"load_pruned: {st} holds tensor {extra_k[0]!r} that the model per plan.json does not "
                         "have" + (f" (and {len(extra_k) - 1} more)" if len(extra_k) > 1 else ""))
    for k in sorted(need):
        if shapes[k] != tuple(target[k].shape):
            raise ValueError(f"load_pruned: {st} tensor {k!r} has shape {shapes[k]}, plan.json implies "
                             f"{tuple(target[k].shape)}")
        if sd_ is not None and target[k].is_floating_point() and dtypes[k] != _SAFE_DTYPE[sd_]:
            raise ValueError(f"load_pruned: {st} tensor {k!r} is {dtypes[k]}, meta.json field "
                             f"'storage_dtype' says {sd_}")

    from safetensors.torch import load_file

    try:
        tensors = load_file(str(st), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"load_pruned: corrupt weights file {st}: {str(e).splitlines()[0]}") from None
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    for k, src in want_aliases.items():
        tensors[k] = tensors[src]
    load_exact(model, tensors)
    n = sum(p.numel() for p in model.parameters())
    if "n_params" in meta and meta["n_params"] != n:
        wm.fail("n_params", f"{meta['n_params']} but the loaded model has {n} parameters")
    model.tsprune_plan = plan
    model.eval()
    return model


_SAFE_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
