"""A job's identity: :func:`config_hash` of its resolved config, minus the keys that never change its numbers."""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

# keys (dotted) that never change a job's numbers: output/cache locations, checkpointing, logging, threads, the
# layout a saved model is written in (save_format)
VOLATILE_KEYS = ("hydra", "paths.output_dir", "paths.cache_dir", "paths.verify_data", "checkpoint", "skip_complete",
                 "threads", "logger", "oac_cache_dir", "method.oac.cache_dir", "save_format")


def plain_config(cfg: DictConfig | dict) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))


def config_hash(cfg: DictConfig | dict) -> str:
    """sha256 (16 hex) of the resolved config without :data:`VOLATILE_KEYS`."""
    d = plain_config(cfg)
    for key in VOLATILE_KEYS:
        *parents, last = key.split(".")
        node = d
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
