"""Reuse a complete result of the same configuration from another sweep (``reuse_results``, default true).

A sweep's ``tag`` names a table; it never changes a number, but it is part of ``config_hash`` (the committed
hashes keep it). Several tables share configurations (hessians_cpu and oac_frontier_cpu contain main_cpu's
SpQR and OAC-SpQR jobs), so a job first looks under ``paths.output_dir``, then under each of ``reuse_roots``
(default ``results/raw``: the committed results, so a sweep split across fresh clones resumes) for a complete
``result.json`` whose config equals its own up to ``tag`` (:func:`oac.jobdir.identity.content_hash`) and was computed in the same
floating-point environment (CPU model and dispatch level, thread count, torch build and version, GPU name:
the keys that move last bits, oac/environment.py). Its result is copied with this job's tag, config, hash and
overrides, and ``reused_from`` naming the original job (its directory, tag and hash). Nothing is recomputed,
so the copy is exactly what rerunning would print on that environment; ``reuse_results=false`` recomputes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from oac.jobdir.identity import config_hash, content_hash
from oac.jobdir.record import RESULT_FILE, missing_metrics, read_result

log = logging.getLogger(__name__)

# the environment keys that decide floating-point results (oac/environment.py); all must be equal
SAME_ENVIRONMENT = ("cpu", "cpu_capability", "threads", "torch", "torch_config", "gpu")


def current_environment(cfg: DictConfig) -> dict:
    """The environment this job would run in (threads as the job will set them)."""
    import torch

    from oac.environment import environment

    env = environment(str(cfg.get("device") or "cpu"))
    if cfg.get("threads"):
        env["threads"] = int(cfg.threads)
    else:
        env["threads"] = torch.get_num_threads()
    return env


def _same_environment(old: dict, env: dict) -> bool:
    o = old.get("environment") or {}
    return all(o.get(k) == env.get(k) for k in SAME_ENVIRONMENT)


def find_reusable(cfg: DictConfig, job_dir: str | os.PathLike, root: str | os.PathLike) -> tuple[dict, Path] | None:
    """A complete result under ``root`` (another job directory) of the same configuration up to ``tag``, from the
    same floating-point environment and covering the metrics ``cfg`` asks for; None if there is none."""
    root, job_dir = Path(root), Path(job_dir).resolve()
    if not root.is_dir():
        return None
    want = content_hash(cfg)
    env = None
    for path in sorted(root.rglob(RESULT_FILE)):
        if path.parent.resolve() == job_dir:
            continue
        old = read_result(path)
        if not old or old.get("status") != "complete" or not old.get("config") or old.get("reused_from"):
            continue  # only originals: a copy points at its original
        if old.get("model") != cfg.model.name or content_hash(old["config"]) != want:
            continue
        env = env or current_environment(cfg)
        if not _same_environment(old, env):
            log.info("not reusing %s: computed in another floating-point environment", path.parent)
            continue
        if missing_metrics(old, cfg):
            continue
        return old, path.parent
    return None


def reused_copy(cfg: DictConfig, old: dict, source: Path, overrides: list[str] | None) -> dict:
    """The result of this job: the original's numbers under this job's identity, with ``reused_from``."""
    from omegaconf import OmegaConf

    return {**old, "tag": cfg.get("tag"), "config": OmegaConf.to_container(cfg, resolve=True),
            "config_hash": config_hash(cfg), "overrides": list(overrides or []),
            "reused_from": {"job_dir": str(source), "tag": old.get("tag"), "config_hash": old.get("config_hash")}}
