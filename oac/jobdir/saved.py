"""Saved quantized models (``save=true``) and reloading them (``quantized_from=<job_dir>``).

Layout of ``<job_dir>/quantized/``::

    block_000.safetensors ...   dequantized weights of the quantized linears of each block, keyed by the
                                module name (``model.layers.0.self_attn.q_proj.weight``), plus what the
                                solver returned in ``SolveResult.masks`` (``<module>.scale``, ``.zero``,
                                ``.perm``, ``.outliers``, ``.salient``, ...)
    manifest.json               base model config (to rebuild it), method, calibration, dtype, bits and
                                per-layer statistics

Everything that is not a quantized linear (embeddings, norms, lm_head) comes from the base model.
With ``save_format=compressed-tensors`` the weights live in ``<job>/compressed/`` instead (``export.py``); the
manifest stays (``saved_format``, ``export_dir``, no block files) and reloading reads the export.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from oac.errors import ConfigError
from oac.io import write_json_atomic
from oac.jobdir.identity import config_hash
from oac.jobdir.resume import QUANTIZED_DIR

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "oac-quantized/1"
BITS_KEYS = ("bits_nominal", "bits_reported", "bits_full", "avg_bits", "n_weights", "outlier_fraction",
             "salient_fraction")


def quantized_dir(job_dir: str | os.PathLike) -> Path:
    """``<job>/quantized`` (a path to the ``quantized`` folder itself is accepted too)."""
    p = Path(job_dir)
    return p if (p / MANIFEST).exists() or p.name == QUANTIZED_DIR else p / QUANTIZED_DIR


def read_manifest(job_dir: str | os.PathLike) -> dict:
    path = quantized_dir(job_dir) / MANIFEST
    if not path.exists():
        raise ConfigError(f"no saved quantized model at {path} (run the job with save=true)")
    with open(path) as f:
        return json.load(f)


def write_manifest(job_dir: str | os.PathLike, cfg: DictConfig, result: dict, model) -> Path:
    """Write the manifest next to the block files (called once quantization is complete)."""
    qdir = Path(job_dir) / QUANTIZED_DIR
    files = sorted(p.name for p in qdir.glob("block_*.safetensors"))
    manifest = {
        "format": FORMAT,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "calib": OmegaConf.to_container(cfg.calib, resolve=True),
        "calibration": result.get("calibration"),
        "config_hash": config_hash(cfg),
        "dtype": str(model.dtype).removeprefix("torch."),
        "base_fingerprint": (result.get("model_info") or {}).get("fingerprint"),
        "files": files,
        "bits": {k: result[k] for k in BITS_KEYS if k in result},
        "layers": result.get("layers", []),
    }
    path = qdir / MANIFEST
    write_json_atomic(path, manifest)
    log.info("saved quantized model: %s (%d block files)", qdir, len(files))
    return path


def restore_weights(model: torch.nn.Module, job_dir: str | os.PathLike, manifest: dict | None = None) -> int:
    """Copy the saved dequantized weights into ``model`` (loaded from the same base). Returns #tensors."""
    from safetensors.torch import load_file

    manifest = manifest or read_manifest(job_dir)
    if manifest.get("saved_format") == "compressed-tensors":  # the weights are in <job>/compressed/ (export.py)
        from oac.jobdir.export import restore_compressed

        return restore_compressed(model, job_dir, manifest)
    qdir = quantized_dir(job_dir)
    n = 0
    for fname in manifest["files"]:
        for key, t in load_file(str(qdir / fname)).items():
            if not key.endswith(".weight"):
                continue
            w = model.get_submodule(key.removesuffix(".weight")).weight
            if w.shape != t.shape:
                raise ConfigError(f"{qdir / fname}: {key} has shape {tuple(t.shape)}, the model {tuple(w.shape)}")
            w.data.copy_(t.to(w.device, w.dtype))
            n += 1
    return n


def load_masks(job_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All saved solver outputs other than weights ({``<module>.<mask>``: tensor})."""
    from safetensors.torch import load_file

    manifest = read_manifest(job_dir)
    out = {}
    for fname in manifest["files"]:
        out.update({k: v for k, v in load_file(str(quantized_dir(job_dir) / fname)).items()
                    if not k.endswith(".weight")})
    return out


def load_quantized(job_dir: str | os.PathLike, *, cache_dir: str = ".cache", device: str = "cpu",
                   dtype: str | None = None):
    """Rebuild the dequantized model of a ``save=true`` job: (model, tokenizer, manifest).

    The base model is loaded from the saved model config (``dtype`` defaults to the saved one) and
    its quantized linears are overwritten with the saved weights.
    """
    from oac.models import load_model, model_fingerprint

    manifest = read_manifest(job_dir)
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{job_dir}: unknown quantized-model format {manifest.get('format')!r}")
    model, tok = load_model(OmegaConf.create(manifest["model"]), cache_dir=cache_dir, device=device,
                            dtype=dtype or manifest["dtype"])
    check_base(manifest, model_fingerprint(model), str(model.dtype))
    n = restore_weights(model, job_dir, manifest)
    log.info("loaded quantized %s / %s from %s (%d linears)", manifest["model"]["name"],
             manifest["method"]["name"], quantized_dir(job_dir), n)
    return model, tok, manifest


def check_base(manifest: dict, fingerprint: str | None, dtype: str) -> None:
    """Warn when the base model differs from the quantized one (comparable only at the same dtype)."""
    base = manifest.get("base_fingerprint")
    if base and fingerprint and dtype.removeprefix("torch.") == manifest.get("dtype") and fingerprint != base:
        log.warning("the base model differs from the one that was quantized (weight fingerprint)")


def with_saved_config(cfg: DictConfig) -> DictConfig:
    """For ``quantized_from=<job>``: model, method and calibration come from the saved manifest."""
    manifest = read_manifest(cfg.quantized_from)
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in ("model", "method", "calib"):
            cfg[key] = OmegaConf.create(manifest[key])
    return cfg


def restore_into_job(cfg: DictConfig, model, result: dict) -> None:
    """Eval-only job: put the saved weights into the loaded base model and copy its bits/stats."""
    manifest = read_manifest(cfg.quantized_from)
    info = result.get("model_info") or {}
    check_base(manifest, info.get("fingerprint"), str(model.dtype))
    restore_weights(model, cfg.quantized_from, manifest)
    result["quantized_from"] = str(quantized_dir(cfg.quantized_from))
    result["calibration"] = manifest.get("calibration")
    result["layers"] = manifest.get("layers", [])
    result.update(manifest.get("bits", {}))
