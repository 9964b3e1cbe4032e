"""Resume a crashed job block by block (the crash checkpoint of a job directory).

* :class:`BlockCheckpoint` is the pipeline's ``on_block_done`` hook. After block k it writes the
  quantized linears of block k to ``<job>/quantized/block_{k:03d}.safetensors`` (once per block) and
  replaces ``<job>/checkpoint.pt`` (block k, the inputs of block k+1, the PipelineState, RNG and
  Hessian-source state) atomically. :meth:`BlockCheckpoint.resume` restores blocks <= k into a freshly
  loaded full-precision model and returns the ``resume=`` argument of ``quantize_model``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from oac.io import atomic_write, quarantine
from oac.jobdir.identity import config_hash

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed from (moved aside; a rerun starts from scratch)."""

QUANTIZED_DIR = "quantized"


def _plain(v, depth: int = 0):
    """True for values safe and meaningful to checkpoint: numbers, strings, tensors and containers of them."""
    if depth > 4:
        return False
    if v is None or isinstance(v, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, (str, int)) and _plain(x, depth + 1) for k, x in v.items())
    return False


def module_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


class BlockCheckpoint:
    """Per-block quantized weights + resumable pipeline state in a job directory.

    ``keep_masks``: also store what solvers return in ``SolveResult.masks`` (codes, scales, outlier
    masks) next to the weights; needs :meth:`wrap` around the solve function.
    ``resumable``: write ``checkpoint.pt`` (otherwise only the block files are written, for ``save``).
    """

    def __init__(self, job_dir: str | os.PathLike, adapter, cfg_hash: str, *, calib_checksum: str | None = None,
                 source=None, keep_masks: bool = False, resumable: bool = True):
        self.dir = Path(job_dir)
        self.adapter = adapter
        self.cfg_hash = cfg_hash
        self.calib_checksum = calib_checksum
        self.source = source
        self.keep_masks = keep_masks
        self.resumable = resumable
        self._names = module_names(adapter.model)
        self._pending: list[dict] = []  # solver masks of layers solved since the last written block

    @property
    def path(self) -> Path:
        return self.dir / CHECKPOINT_FILE

    def block_path(self, k: int) -> Path:
        return self.dir / QUANTIZED_DIR / f"block_{k:03d}.safetensors"

    def wrap(self, solve: Callable) -> Callable:
        """A solve function that remembers each result's masks (in solve order) for :meth:`write_block`."""
        def recording_solve(W, H, cfg):
            res = solve(W, H, cfg)
            if self.keep_masks:
                self._pending.append({k: v.detach().cpu() for k, v in res.masks.items()
                                      if isinstance(v, torch.Tensor)})
            return res
        return recording_solve

    def write_block(self, k: int, names: list[str] | None = None) -> None:
        """Write the quantized linears of block k (+ the masks of ``names``, in solve order)."""
        from safetensors.torch import save_file

        block = self.adapter.blocks[k]
        linears = self.adapter.linears(block)
        tensors = {}
        for name, lin in linears.items():
            tensors[f"{self._names[id(lin)]}.weight"] = lin.weight.detach().to("cpu").contiguous()
        if self.keep_masks:
            for name in names if names is not None else list(linears):
                masks = self._pending.pop(0) if self._pending else {}
                full = self._names[id(linears[name])]
                for mk, mv in masks.items():
                    tensors[f"{full}.{mk}"] = mv.contiguous()
        atomic_write(self.block_path(k), lambda tmp: save_file(tensors, tmp, metadata={"block": str(k)}))

    def on_block_done(self, k: int, state, inps: torch.Tensor) -> None:
        self.write_block(k, [r["name"] for r in state.layers if r["block"] == k])
        if not self.resumable:
            return
        src = source_state(self.source)
        ckpt = {"block": k, "inps": inps.detach().cpu(), "state": dataclasses.asdict(state),
                "config_hash": self.cfg_hash, "calib_checksum": self.calib_checksum,
                "rng": torch.get_rng_state(), "source": src}
        atomic_write(self.path, lambda tmp: torch.save(ckpt, tmp))
        log.info("checkpoint: %d of %d blocks done (%s)", k + 1, len(self.adapter.blocks), self.path)

    def resume(self) -> dict | None:
        """Restore quantized blocks <= k from a valid checkpoint; return ``quantize_model``'s ``resume``."""
        if not self.resumable or not self.path.exists():
            return None
        from oac.pipeline import PipelineState

        try:
            ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or garbage: start from scratch, keep the file for inspection
            quarantine(self.path, f"{type(e).__name__}")
            return None
        if ckpt.get("config_hash") != self.cfg_hash or ckpt.get("calib_checksum") != self.calib_checksum:
            log.warning("ignoring %s: written by a different config or calibration set", self.path)
            return None
        k = int(ckpt["block"])
        try:
            for j in range(k + 1):
                self.restore_block(j)
        except Exception as e:  # a block file is unreadable: the weights restored so far are from the base model
            quarantine(self.path, f"block file unreadable: {type(e).__name__}: {e}")
            raise ResumeError(f"{self.dir}: the checkpoint's block files cannot be read; moved the checkpoint "
                              "aside, rerun to start from scratch") from None
        torch.set_rng_state(ckpt["rng"])
        restore_source_state(self.source, ckpt.get("source", {}))
        log.info("resuming from %s: blocks 0..%d restored, continuing at block %d", self.path, k, k + 1)
        return {"block": k + 1, "inps": ckpt["inps"], "state": PipelineState(**ckpt["state"])}

    def restore_block(self, k: int) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(self.block_path(k)))
        for lin in self.adapter.linears(self.adapter.blocks[k]).values():
            w = saved[f"{self._names[id(lin)]}.weight"]
            lin.weight.data.copy_(w.to(lin.weight.device, lin.weight.dtype))


def _state_keys(source) -> list[str]:
    """The attributes of a Hessian source that are run state (``RESUME_STATE``; default: every plain attribute).
    Options (``cache_dir``, ``refresh``, ...) come from the job config, never from a checkpoint."""
    keys = getattr(source, "RESUME_STATE", None)
    return [a for a in vars(source) if keys is None or a in keys]


def source_state(source) -> dict:
    if source is None:
        return {}
    return {a: getattr(source, a) for a in _state_keys(source) if _plain(getattr(source, a))}


def restore_source_state(source, saved: dict) -> None:
    if source is not None:
        keys = set(_state_keys(source))
        vars(source).update({a: v for a, v in saved.items() if a in keys})


def make_checkpoint(cfg: DictConfig, adapter, out_dir, *, calib_checksum: str | None = None, source=None,
                    calibrated: bool = True) -> BlockCheckpoint | None:
    """The job's block writer: resumable for calibrated methods with ``checkpoint=true``, and/or the
    per-block files of ``save=true``. None when neither applies (or no job directory)."""
    resumable = calibrated and bool(cfg.get("checkpoint", False))
    save = bool(cfg.get("save", False))
    if out_dir is None or not (resumable or save):
        return None
    return BlockCheckpoint(out_dir, adapter, config_hash(cfg), calib_checksum=calib_checksum, source=source,
                           keep_masks=save, resumable=resumable)


def clear_checkpoint(out_dir: str | os.PathLike, *, keep_blocks: bool) -> None:
    """Delete ``checkpoint.pt`` (and the block files unless the quantized model is kept)."""
    d = Path(out_dir)
    (d / CHECKPOINT_FILE).unlink(missing_ok=True)
    qdir = d / QUANTIZED_DIR
    if not keep_blocks and qdir.exists() and not (qdir / "manifest.json").exists():  # never a saved model
        for f in qdir.glob("block_*.safetensors"):
            f.unlink()
        if not any(qdir.iterdir()):
            qdir.rmdir()
