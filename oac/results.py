"""result.json: one file per job, written atomically so a crash never leaves a half-written record."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

RESULT_FILE = "result.json"


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".result-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_result(path: str | os.PathLike) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def versions() -> dict:
    import datasets
    import tokenizers
    import torch
    import transformers

    import oac

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "datasets": datasets.__version__, "tokenizers": tokenizers.__version__, "oac": oac.__version__}
    try:
        from importlib.metadata import version

        out["lm_eval"] = version("lm_eval")
    except Exception:  # pragma: no cover - lm-eval is a declared dependency
        out["lm_eval"] = None
    return out
