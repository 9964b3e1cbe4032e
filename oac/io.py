"""Crash-safe files: every file the project writes appears whole under its final name or not at all.

``atomic_write(path, write)`` calls ``write(tmp)`` on a temporary name in the same folder, fsyncs it and
renames it over ``path``; ``write_json_atomic`` is the strict-JSON case. ``quarantine(path)`` moves a file
that cannot be read aside (``<name>.corrupt-<unix time>``) so the next run rebuilds it instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _finite_only(obj):
    """Replace NaN/±Infinity floats by None so the file is strict JSON (RFC 8259 has no NaN)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Strict JSON (non-finite floats written as null), atomically."""
    text = json.dumps(_finite_only(obj), indent=1, default=str, allow_nan=False)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def quarantine(path: str | os.PathLike, reason: str) -> Path:
    """Move an unreadable file aside (one warning line) and return its new name."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    os.replace(path, dest)
    log.warning("%s could not be read (%s): moved aside to %s; it will be rebuilt", path, reason, dest.name)
    return dest
