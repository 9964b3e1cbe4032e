"""One job = one command:  python -m experiments.run model=smollm2-135m method=gptq method.wbits=3

Writes result.json into the Hydra job directory (hydra.run.dir / the sweep subdir).

Bad input is one line and a non-zero exit (2: configuration, 3: the job directory is locked by a live job,
1: the job ran and failed, e.g. a non-finite result). A sweep (``-m``) runs every job, then prints a summary
(n complete / failed / skipped, and each failure's overrides and error) and exits 1 if any job failed.
With a cluster launcher the jobs run elsewhere: ``make report`` lists the incomplete ones.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from oac.errors import ConfigError
from oac.jobdir import JobLocked
from oac.jobdir.resume import ResumeError
from oac.solvers.common import HessianError

log = logging.getLogger("experiments.run")

# one line, no traceback: the error says what to change
CLEAR_ERRORS = (ConfigError, HessianError, JobLocked, ResumeError)
EXIT_CODES = {JobLocked: 3, ConfigError: 2}

_SWEEP: list[dict] = []  # jobs of this process's multirun (basic launcher): status, overrides, error


def _exit_code(e: BaseException) -> int:
    return next((c for t, c in EXIT_CODES.items() if isinstance(e, t)), 1)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from oac.job import ResultError, run_job

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    overrides = list(hc.overrides.task)
    job = {"overrides": " ".join(overrides), "status": "failed", "error": None}
    if multirun:
        _SWEEP.append(job)
    try:
        result = run_job(cfg, hc.runtime.output_dir, overrides=overrides)
    except (*CLEAR_ERRORS, ResultError) as e:
        job["error"] = f"{type(e).__name__}: {e}"
        log.error("%s", e)
        if multirun:  # a failed job never blocks the rest of a sweep; its result.json says failed
            return None
        sys.exit(_exit_code(e))
    except Exception as e:
        job["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        if multirun:
            log.exception("job failed (recorded in result.json); continuing the sweep")
            return None
        raise
    job["status"] = "skipped" if result.get("skipped") else result.get("status")
    ppl = result.get("ppl", {})
    log.info("result: %s", {k: round(v, 4) for k, v in ppl.items()})
    return next(iter(ppl.values()), None)


def sweep_summary(jobs: list[dict]) -> tuple[str, bool]:
    """The end-of-sweep lines and whether any job failed."""
    n = {s: sum(j["status"] == s for j in jobs) for s in ("complete", "skipped", "failed")}
    lines = [f"sweep: {len(jobs)} jobs: {n['complete']} complete, {n['failed']} failed, {n['skipped']} skipped"]
    lines += [f"  FAILED {j['overrides'] or '(no overrides)'}: {j['error']}" for j in jobs if j["status"] == "failed"]
    return "\n".join(lines), n["failed"] > 0


if __name__ == "__main__":
    main()
    if _SWEEP:
        text, failed = sweep_summary(_SWEEP)
        print(text, file=sys.stderr if failed else sys.stdout)
        if failed:
            sys.exit(1)
