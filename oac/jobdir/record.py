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
    why = missing_metrics(old, cfg)
    if why:
        log.info("%s holds a complete result without %s: rerunning", job_dir, why)
        return None
    threads = (old.get("environment") or {}).get("threads")
    if cfg.get("threads") and threads and int(cfg.threads) != threads:
        log.warning("%s: complete result kept, but it was computed with %s threads, not %s (last bits may differ)",
                    job_dir, threads, cfg.threads)
    return old


def missing_metrics(old: dict, cfg: DictConfig) -> str | None:
    """What a complete result lacks that ``cfg`` asks for (the keys outside the hash): a KL set or its reference
    store, or a local evaluation text whose content changed since. None when it covers the request."""
    from oac.data.tokens import eval_set
    from oac.data.text import local_text

    method = cfg.get("method") or {}
    quantizes = bool(method.get("solver")) or bool(cfg.get("quantized_from"))
    kcfg = (cfg.get("eval") or {}).get("kl") or {}
    details = old.get("kl_details") or {}
    for entry in (kcfg.get("datasets") or []) if quantizes else []:
        key = eval_set(entry)[0]
        if key not in (old.get("kl") or {}):
            return f"KL on {key}"
        want = kcfg.get("reference", "full")
        if details.get(key, {}).get("reference") != want or (
                want == "topk" and details[key].get("topk") != kcfg.get("topk")):
            return f"KL on {key} with reference={want}"
    for key, d in (old.get("ppl_details") or {}).items():
        if d.get("sha256") and d.get("source"):
            try:
                if local_text(d["source"])[1] != d["sha256"]:
                    return f"the current content of {d['source']}"
            except Exception:  # noqa: BLE001 - the file is gone: the job fails in validation instead
                return f"the file {d['source']}"
    return None
