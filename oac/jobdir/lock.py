"""``<job>/.lock``: one job at a time in a job directory.

The lock file holds host, pid, start time (and the SLURM job id when there is one). Rules:

* held by a live process on this host → refuse, with one line naming the holder;
* left by a process that is gone (same host, pid not running) → taken over with a warning (a killed job);
* held from another host → refuse (its liveness cannot be checked from here), unless it carries the same
  ``SLURM_JOB_ID`` as this process: a requeued SLURM job keeps its id, so its previous attempt's lock is
  taken over. A stale lock from another host is removed by hand (the message says which file).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class JobLocked(RuntimeError):
    """Another live job holds this job directory."""


def holder_info() -> dict:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return info


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(job_dir: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(job_dir) / LOCK_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


def holder_alive(info: dict | None) -> bool | None:
    """True/False for a lock of this host; None when it cannot be told (another host)."""
    if not info:
        return False
    if info.get("host") != socket.gethostname():
        return None
    return pid_alive(int(info.get("pid", -1)))


class JobLock:
    def __init__(self, job_dir: str | os.PathLike):
        self.path = Path(job_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = holder_info()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse(me)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise JobLocked(f"{self.path}: could not take the job lock (another job keeps taking it)")

    def _take_over_or_refuse(self, me: dict) -> None:
        info = read_lock(self.path.parent)
        if info is None:  # being written right now, or garbage: give the writer a moment
            time.sleep(0.2)
            info = read_lock(self.path.parent)
            if info is None:
                log.warning("%s is unreadable: taking the job lock over", self.path)
                self.path.unlink(missing_ok=True)
                return
        alive = holder_alive(info)
        same_slurm = info.get("slurm_job_id") and info.get("slurm_job_id") == me.get("slurm_job_id")
        if same_slurm or alive is False:
            why = "a requeue of the same SLURM job" if same_slurm else "its process is gone"
            log.warning("taking over the job lock of %s pid %s (since %s): %s", info.get("host"), info.get("pid"),
                        info.get("start"), why)
            self.path.unlink(missing_ok=True)
            return
        where = "running" if alive else "on another host (cannot check it from here; delete the file if it is dead)"
        raise JobLocked(f"{self.path.parent} is locked by {info.get('host')} pid {info.get('pid')} since "
                        f"{info.get('start')}, {where}: {self.path}")

    def release(self) -> None:
        if self.held:
            info = read_lock(self.path.parent)
            if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
