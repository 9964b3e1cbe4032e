"""A job's identity: :func:`config_hash` of its resolved config, minus the keys that never change its numbers."""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

# keys (dotted) that never change a job's numbers: output/cache locations, checkpointing, logging, threads (the
# thread count can move last bits: it is recorded in result.json "environment", oac/environment.py), the layout a
# saved model is written in (save_format), whether a result may be copied from another sweep (reuse_results).
# A Hessian source's cache directory (``method.<source>.cache_dir``: oac, guided, any source a registry entry adds)
# is dropped by rule (:data:`VOLATILE_METHOD_OPTIONS`), so a new source cannot forget it.
# eval.kl adds metrics without changing any other: a complete result that lacks a requested KL is rerun
# (oac.jobdir.record.missing_metrics), so it needs no place in the hash.
VOLATILE_KEYS = ("hydra", "paths.output_dir", "paths.cache_dir", "paths.verify_data", "checkpoint", "skip_complete",
                 "threads", "logger", "oac_cache_dir", "save_format", "eval.kl",
                 "reuse_results", "reuse_roots")
# option names that never change a number in any option group of ``method`` (method.oac, method.guided, ...)
VOLATILE_METHOD_OPTIONS = ("cache_dir",)
# keys added after results were committed: they enter the hash only when set, so older jobs keep their hash
DEFAULT_KEYS = {"jitter_seed": None, "eval.ppl.max_tokens": None}


def plain_config(cfg: DictConfig | dict) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))


def identity_config(cfg: DictConfig | dict) -> dict:
    """The resolved config as it is hashed: without :data:`VOLATILE_KEYS`, :data:`VOLATILE_METHOD_OPTIONS` (and
    :data:`DEFAULT_KEYS` at their default)."""
    d = plain_config(cfg)
    for group in (d.get("method") or {}).values():
        if isinstance(group, dict):
            for k in VOLATILE_METHOD_OPTIONS:
                group.pop(k, None)
    for key in (*VOLATILE_KEYS, *DEFAULT_KEYS):
        *parents, last = key.split(".")
        node = d
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and (key not in DEFAULT_KEYS or node[last] == DEFAULT_KEYS[key]):
            node.pop(last)
    return d


def config_hash(cfg: DictConfig | dict) -> str:
    """sha256 (16 hex) of :func:`identity_config`."""
    return hashlib.sha256(json.dumps(identity_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_hash(cfg: DictConfig | dict) -> str:
    """:func:`config_hash` without ``tag``: equal for the same job run under two sweeps (oac/jobdir/reuse.py)."""
    d = plain_config(cfg)
    d.pop("tag", None)
    return config_hash(d)
