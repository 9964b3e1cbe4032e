"""Reusable Ĥ on disk (``cache_dir/oac_hessian/<key>-b<j>.pt``), keyed by everything that decides its bytes.

The key hashes the source's options that affect Ĥ, the compute device type, the calibration ids checksum,
a fingerprint of the modules of the gradient pass (blocks s..K−1 and the head, full precision when the
pass runs), the sha256 of the cached inputs of block s (the pass start) and s itself. Reuse is therefore
exact (the same numbers as recomputing on the same device/software):

* refresh=once: s = 0, the inputs of block 0 only depend on the embeddings and the data, so Ĥ is reused by
  every method/solver on the same model, data and options;
* refresh=per_block/every: the inputs digest of block s changes as soon as any earlier block was quantized
  differently, so Ĥ is reused only when all blocks < s were quantized identically (a rerun, a resume).

An entry that cannot be read is moved aside (``oac.io.quarantine``) and recomputed.

Beside the tensors, ``<key>.cost.json`` records what computing the entry cost (block forward+backward passes,
head passes, seconds, on the machine that computed it), so a job that reloads Ĥ can still report the cost of its
Hessians (``hessian.stats.cached_*``) and a refresh frontier never shows a reloaded Ĥ as free.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from oac.io import atomic_write, quarantine

log = logging.getLogger(__name__)

CACHE_VERSION = 1


class HessianCache:
    def __init__(self, cache_dir: str | Path, kind: str = "oac_hessian"):
        self.dir = Path(cache_dir) / kind

    @staticmethod
    def key(options: dict, *, device, calib_ids: Tensor, modules: list[nn.Module], inps: Tensor, start: int,
            n_blocks: int) -> str:
        from oac.data.tokens import ids_checksum

        key = {"v": CACHE_VERSION, **options, "device": torch.device(device).type, "calib": ids_checksum(calib_ids),
               "modules": modules_fingerprint(modules), "inps": tensor_digest(inps), "start": start,
               "n_blocks": n_blocks}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def path(self, key: str, j: int) -> Path:
        return self.dir / f"{key}-b{j}.pt"

    def load(self, key: str, blocks: list[int]) -> dict[int, dict[str, Tensor]] | None:
        """Ĥ of every block in ``blocks`` or None (a miss, or an unreadable entry, moved aside)."""
        paths = {j: self.path(key, j) for j in blocks}
        if not all(p.exists() for p in paths.values()):
            return None
        out = {}
        for j, p in paths.items():
            try:
                out[j] = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated or garbage file
                quarantine(p, f"{type(e).__name__}")
                return None
        log.info("Ĥ of blocks %s loaded from the cache (%s)", blocks, key)
        return out

    def save(self, key: str, result: dict[int, dict[str, Tensor]]) -> None:
        for j, H in result.items():
            tensors = {n: h.detach().cpu() for n, h in H.items()}
            atomic_write(self.path(key, j), lambda tmp: torch.save(tensors, tmp))

    def cost_path(self, key: str) -> Path:
        return self.dir / f"{key}.cost.json"

    def save_cost(self, key: str, cost: dict) -> None:
        atomic_write(self.cost_path(key), lambda tmp: Path(tmp).write_text(json.dumps(cost, sort_keys=True)))

    def cost(self, key: str) -> dict | None:
        """What computing entry ``key`` cost, or None (an entry from before costs were recorded, or unreadable)."""
        try:
            return json.loads(self.cost_path(key).read_text())
        except (OSError, ValueError):
            return None


def tensor_digest(t: Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype, any device)."""
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    flat = t.detach().contiguous().reshape(-1)
    step = 1 << 26
    for i in range(0, flat.numel(), step):
        h.update(flat[i : i + step].cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def modules_fingerprint(modules: list[nn.Module]) -> str:
    """Checksum of parameters and buffers of modules: shape, dtype, first/last values, sum, sum of squares."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            flat = t.detach().reshape(-1)
            f = flat.double()
            h.update(f"{i}.{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(json.dumps([float(f[0]), float(f[-1]), float(f.sum()), float(f.square().sum())]).encode())
    return h.hexdigest()[:32]
