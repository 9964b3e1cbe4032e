"""KL divergence of the quantized model's next-token distribution from the full-precision model's.

Per predicted token t (the seqlen-1 positions of every perplexity window), in fp32 over the full vocabulary:

    KL_t = Σ_v p_FP(v | x<t) · (log p_FP(v | x<t) − log p_Q(v | x<t)),      KL = mean over all tokens (nats)

and top-1 agreement = the fraction of tokens whose argmax matches. The reference comes from the unquantized
model on the same windows, computed *before* quantization and cached on disk, so a job never holds two
models (FP pass → reference on disk → quantize → Q pass, which streams the reference back batch by batch).

Two reference stores (``eval.kl.reference``):

* ``full`` (default, exact): the fp32 log-probabilities of every token, an ``.npy`` appended and read back
  one batch at a time (plain file I/O, no memory map). Disk: windows × (seqlen−1) × vocab × 4 bytes (SmolLM2, 20 windows of 512:
  2.06 GB per set); memory: 64 tokens × vocab at a time.
* ``topk``: the k largest log-probabilities, their token ids and the log of the remaining mass. KL is then
  computed on the coarsened distribution (the k tokens + one "rest" bin), which by the data-processing
  inequality is a lower bound of the exact KL; top-1 agreement is exact. Disk: × k/vocab of the full store.

The cache key is the model (path, dtype, weight fingerprint), the device kind, the windows' token checksum,
the store and k, so any other model, data or protocol misses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oac.errors import ConfigError
from oac.io import atomic_write, quarantine

log = logging.getLogger(__name__)

MODES = ("full", "topk")


CHUNK = 64  # predicted tokens per step: the fp32 temporaries are CHUNK x vocab, not seqlen x vocab


def _chunks(logits: torch.Tensor):
    """(window in batch, first token, fp32 log-probs [≤ CHUNK, V]) over the predicted positions of a batch."""
    T = logits.shape[1] - 1
    for w in range(logits.shape[0]):
        for t0 in range(0, T, CHUNK):
            yield w, t0, F.log_softmax(logits[w, t0:min(t0 + CHUNK, T)].float(), dim=-1).cpu()


def reference_bytes(n_windows: int, seqlen: int, vocab: int, mode: str, topk: int) -> int:
    per_token = vocab * 4 if mode == "full" else topk * 8 + 4
    return n_windows * (seqlen - 1) * per_token


def reference_path(cache_dir, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / "kl_reference" / f"{key['mode']}-{digest}" / ("logprobs.npy" if key["mode"] == "full"
                                                                            else "topk.pt")


class ReferenceWriter:
    """``on_logits`` callback of the FP perplexity pass: stores the reference of every batch."""

    def __init__(self, path: Path, n_windows: int, seqlen: int, vocab: int, mode: str, topk: int):
        self.path, self.mode, self.topk = Path(path), mode, topk
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}{self.path.suffix}")
        shape = (n_windows, seqlen - 1)
        if mode == "full":  # plain appends (no memory map: the written pages never count as this process's memory)
            self.store = open(self.tmp, "wb")
            np.lib.format.write_array_header_2_0(self.store, {"descr": np.lib.format.dtype_to_descr(
                np.dtype(np.float32)), "fortran_order": False, "shape": (*shape, vocab)})
            self.next = 0
        else:
            self.store = {"values": torch.empty(*shape, topk), "indices": torch.empty(*shape, topk, dtype=torch.int32),
                          "log_rest": torch.empty(shape)}

    def __call__(self, b0: int, x: torch.Tensor, logits: torch.Tensor) -> None:
        if self.mode == "full":
            assert b0 == self.next, "reference batches must arrive in order"
            self.next = b0 + logits.shape[0]
        for w, t0, lp in _chunks(logits):  # window-major, token chunks in order: plain appends
            if self.mode == "full":
                self.store.write(np.ascontiguousarray(lp.numpy(), dtype=np.float32).tobytes())
                continue
            vals, idx = lp.topk(self.topk, dim=-1)
            kept = vals.double().exp().sum(-1)
            t1 = t0 + lp.shape[0]
            self.store["values"][b0 + w, t0:t1] = vals
            self.store["indices"][b0 + w, t0:t1] = idx.to(torch.int32)
            self.store["log_rest"][b0 + w, t0:t1] = torch.log1p(-kept.clamp(max=1.0)).float()  # -inf: nothing left

    def close(self) -> None:
        if self.mode == "full":
            self.store.flush()
            os.fsync(self.store.fileno())
            self.store.close()
            os.replace(self.tmp, self.path)
        else:
            atomic_write(self.path, lambda tmp: torch.save(self.store, tmp))


def _open(path: Path, mode: str, n_windows: int, seqlen: int, topk: int):
    """The stored reference, or None when absent or unusable (a corrupt file is moved aside)."""
    if not path.exists():
        return None
    try:
        if mode == "full":
            ref = FullReference(path)
            ok = len(ref.shape) == 3 and ref.shape[:2] == (n_windows, seqlen - 1) and ref.complete
        else:
            ref = torch.load(path, map_location="cpu", weights_only=True)
            ok = tuple(ref["values"].shape) == (n_windows, seqlen - 1, topk)
    except Exception as e:  # noqa: BLE001 - an unreadable cache entry is a miss, never a result
        quarantine(path, f"{type(e).__name__}: {e}".splitlines()[0])
        return None
    if not ok:
        quarantine(path, "wrong shape or dtype")
        return None
    return ref


class FullReference:
    """Batch-by-batch reader of a full ``.npy`` reference (plain reads, no memory map)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or dtype != np.float32:
            raise ValueError(f"{path}: not a C-order float32 array")
        self.shape = tuple(shape)
        self.row = int(np.prod(self.shape[1:]))
        self.complete = self.path.stat().st_size == self.offset + 4 * self.row * self.shape[0]

    def read(self, w: int, t0: int, t1: int) -> np.ndarray:
        """Tokens t0..t1 of window w: [t1 - t0, vocab]."""
        vocab = self.shape[2]
        with open(self.path, "rb") as f:
            f.seek(self.offset + 4 * (w * self.row + t0 * vocab))
            out = np.fromfile(f, dtype=np.float32, count=(t1 - t0) * vocab)
        return out.reshape(t1 - t0, vocab)


def ensure_reference(model, windows: torch.Tensor, *, cache_dir, key: dict, batch_size: int, device,
                     desc: str = "kl reference") -> dict:
    """Compute (or find) the FP reference of ``windows``. Returns {path, mode, topk, cached, time_s, bytes, ppl_fp}."""
    from oac.eval.perplexity import perplexity

    mode, topk = key["mode"], int(key.get("topk") or 0)
    if mode not in MODES:
        raise ConfigError(f"eval.kl.reference must be one of {MODES}, not {mode!r}")
    n, seqlen = windows.shape
    path = reference_path(cache_dir, key)
    info = {"path": str(path), "mode": mode, "topk": topk if mode == "topk" else None, "key": key}
    if _open(path, mode, n, seqlen, topk) is not None:
        log.info("KL reference from the cache: %s", path)
        return {**info, "cached": True, "time_s": 0.0, "bytes": path.stat().st_size}
    vocab = model.get_output_embeddings().weight.shape[0]
    need = reference_bytes(n, seqlen, vocab, mode, topk)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if need > 0.9 * free:
        raise ConfigError(f"KL reference needs {need / 1e9:.1f} GB under {path.parent} ({free / 1e9:.1f} GB free); "
                          "use eval.kl.reference=topk, fewer windows, or eval.kl.datasets=[]")
    t = time.perf_counter()
    writer = ReferenceWriter(path, n, seqlen, vocab, mode, topk)
    r = perplexity(model, windows.reshape(1, -1), seqlen, batch_size=batch_size, device=device, desc=desc,
                   on_logits=writer)
    writer.close()
    dt = time.perf_counter() - t
    log.info("KL reference (%s, %.2f GB) in %.1f s: %s", mode, path.stat().st_size / 1e9, dt, path)
    return {**info, "cached": False, "time_s": dt, "bytes": path.stat().st_size, "ppl_fp": r["ppl"]}


class KLAccumulator:
    """``on_logits`` callback of the quantized model's perplexity pass: KL and top-1 agreement vs the reference."""

    def __init__(self, ref: dict, n_windows: int, seqlen: int):
        self.mode = ref["mode"]
        self.ref = _open(Path(ref["path"]), self.mode, n_windows, seqlen, int(ref.get("topk") or 0))
        if self.ref is None:
            raise RuntimeError(f"KL reference {ref['path']} disappeared or is unreadable")
        self.kl_sum, self.agree, self.n = 0.0, 0, 0

    def __call__(self, b0: int, x: torch.Tensor, logits: torch.Tensor) -> None:
        for w, t0, lq in _chunks(logits):
            t1 = t0 + lq.shape[0]
            if self.mode == "full":
                lp = torch.from_numpy(self.ref.read(b0 + w, t0, t1))
                kl = kl_full(lp, lq)
                top_p = lp.argmax(-1)
            else:
                vals, idx = self.ref["values"][b0 + w, t0:t1], self.ref["indices"][b0 + w, t0:t1].long()
                kl = kl_topk(vals, idx, self.ref["log_rest"][b0 + w, t0:t1], lq)
                top_p = idx[..., 0]
            self.kl_sum += float(kl.double().sum())
            self.agree += int((top_p == lq.argmax(-1)).sum())
            self.n += kl.numel()

    def result(self) -> dict:
        return {"kl": self.kl_sum / self.n, "top1_agreement": self.agree / self.n, "n_predicted": self.n}


def kl_full(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p ‖ q) from full log-probabilities [..., V] (fp32; p = 0 terms are 0)."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=lp.dtype)).sum(-1)


def kl_topk(vals: torch.Tensor, idx: torch.Tensor, log_rest: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Per-token KL of the coarsened distributions (the k reference tokens + one bin for the rest), in fp64."""
    lq_k = lq.gather(-1, idx).double()
    vals = vals.double()
    kept = (vals.exp() * (vals - lq_k)).sum(-1)
    q_rest = (1 - lq_k.exp().sum(-1)).clamp(min=1e-300)
    p_rest = log_rest.double().exp()
    rest = torch.where(p_rest > 0, p_rest * (log_rest.double() - q_rest.log()), torch.zeros((), dtype=torch.float64))
    return kept + rest
