"""result.json: one file per job, strict JSON, written atomically so a crash never leaves a half-written record."""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path

from omegaconf import DictConfig

from oac.io import write_json_atomic
from oac.jobdir.identity import config_hash

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def write_result(job_dir: str | os.PathLike, result: dict) -> Path:
    return write_json_atomic(Path(job_dir) / RESULT_FILE, result)


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


def completed_result(cfg: DictConfig, job_dir: str | os.PathLike) -> dict | None:
    """The previous result in ``job_dir`` if it is complete and was produced by the same config (same hash)."""
    old = read_result(Path(job_dir) / RESULT_FILE)
    if not old or old.get("status") != "complete":
        return None
    old_hash = old.get("config_hash") or (config_hash(old["config"]) if "config" in old else None)
    if old_hash != config_hash(cfg):
        log.info("%s holds a complete result of a different config: rerunning", job_dir)
        return None
    return old
