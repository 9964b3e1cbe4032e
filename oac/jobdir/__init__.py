"""Everything about a job folder, in one room. A job directory holds::

    result.json      the record: status (running → complete | failed), config, config_hash, numbers (record.py)
    .lock            who runs the job now: host, pid, start (lock.py)
    checkpoint.pt    crash checkpoint of the block loop, plus quantized/block_*.safetensors (resume.py)
    quantized/       with save=true: the kept quantized model and its manifest.json (saved.py)
    compressed/      with save_format=compressed-tensors: the model as a compressed-tensors HF folder (export.py);
                     quantized/ then keeps only its manifest

A job's identity is its ``config_hash`` (identity.py). The job runner talks to this package through
:class:`JobDir` only.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from omegaconf import DictConfig

from oac.jobdir.identity import config_hash
from oac.jobdir.lock import JobLock, JobLocked, holder_alive, read_lock
from oac.jobdir.record import RESULT_FILE, completed_result, read_result, write_result
from oac.jobdir.resume import BlockCheckpoint, clear_checkpoint, make_checkpoint

__all__ = ["JobDir", "JobLocked", "RESULT_FILE", "config_hash", "read_result", "job_state"]


class JobDir:
    def __init__(self, path: str | os.PathLike, cfg: DictConfig):
        self.path = Path(path)
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self._lock = JobLock(self.path)

    def completed(self) -> dict | None:
        """The result of an earlier complete run of the same config (the job is then skipped)."""
        return completed_result(self.cfg, self.path)

    def reuse(self, roots: list[str | os.PathLike], overrides: list[str] | None = None) -> dict | None:
        """Copy a complete result of the same configuration up to ``tag`` found under the first of ``roots`` that
        has one (reuse.py), under the lock; None when there is none."""
        from oac.jobdir.reuse import find_reusable, reused_copy

        found = next((f for root in roots if (f := find_reusable(self.cfg, self.path, root)) is not None), None)
        if found is None:
            return None
        result = reused_copy(self.cfg, *found, overrides)
        self._lock.acquire()
        try:
            self.write(result)
        finally:
            self._lock.release()
        return result

    def begin(self, result: dict) -> None:
        """Take the lock (or raise :class:`JobLocked`) and record ``status: running`` with host, pid, start."""
        self._lock.acquire()
        result["run"] = {"host": socket.gethostname(), "pid": os.getpid(),
                         "start": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        self.write(result)

    def write(self, result: dict) -> None:
        write_result(self.path, result)

    def block_writer(self, adapter, *, calibrated: bool, calib_checksum: str | None = None,
                     source=None) -> BlockCheckpoint | None:
        """The block loop's checkpoint (resumable when calibrated) and/or the per-block files of save=true."""
        return make_checkpoint(self.cfg, adapter, self.path, calib_checksum=calib_checksum, source=source,
                               calibrated=calibrated)

    def save_manifest(self, result: dict, model, tokenizer=None) -> None:
        """save=true: the native save's manifest, then (save_format=compressed-tensors) the export; the saved
        format, location and size go to ``result["saved"]``."""
        from oac.jobdir.export import save_record
        from oac.jobdir.saved import write_manifest

        write_manifest(self.path, self.cfg, result, model)
        result["saved"] = save_record(self.path, self.cfg, model, tokenizer, result)

    def end(self, *, keep_blocks: bool, clear: bool = True) -> None:
        """Drop the crash checkpoint (unless the job failed: ``clear=False``) and release the lock."""
        try:
            if clear:
                clear_checkpoint(self.path, keep_blocks=keep_blocks)
                if keep_blocks and self.cfg.get("save_format", "native") != "native":
                    from oac.jobdir.export import finish_save

                    finish_save(self.path, self.cfg)
        finally:
            self._lock.release()


def job_state(result: dict, job_dir: str | os.PathLike) -> str:
    """The status to report: ``interrupted`` for a ``running`` record whose lock holder is gone."""
    status = result.get("status") or "unknown"
    if status == "running":
        lock = read_lock(job_dir)
        if lock is None or holder_alive(lock) is False:
            return "interrupted"
    return status
