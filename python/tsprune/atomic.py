"""Atomic file writes, the one writer every saved file of tsprune goes through (checkpoint
directories, journal records, CLI outputs, plots, pre-training checkpoints, downloaded CSVs).

Imports only the standard library, so the data layer (:mod:`tsprune.data.sources`, numpy and
pandas only) can use it as well as the torch-side modules.
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile

__all__ = ["atomic_write", "atomic_json", "json_text"]


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide and not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def atomic_write(path, write, check=None) -> None:
    """Write a file atomically: ``write(f)`` fills a binary temp file beside ``path`` (created with
    its folder if needed), which is fsynced, given the umask's permissions (mkstemp makes 0600),
    passed to ``check(temp_path)`` if given (which raises to refuse it: e.g. a downloaded file
    that does not parse) and renamed over ``path``; on any failure the temp file goes and ``path``
    is untouched."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(o):
    if isinstance(o, pathlib.Path):
        return str(o)
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def json_text(obj) -> str:
    """``obj`` as the JSON tsprune writes (indent 1; paths as strings, numbers that are not
    Python floats (numpy, tensors) as floats, anything else as its str)."""
    return json.dumps(obj, indent=1, default=_json_default) + "\n"


def atomic_json(path, obj) -> None:
    """``json_text(obj)`` written with ``atomic_write``."""
    text = json_text(obj).encode()
    atomic_write(path, lambda f: f.write(text))
