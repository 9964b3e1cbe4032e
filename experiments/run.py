"""One job = one command:  python -m experiments.run model=smollm2-135m method=gptq method.wbits=3

Writes result.json into the Hydra job directory (hydra.run.dir / the sweep subdir).
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from oac.errors import ConfigError
from oac.solvers.common import HessianError

log = logging.getLogger("experiments.run")


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from oac.job import run_job

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        result = run_job(cfg, hc.runtime.output_dir)
    except (ConfigError, HessianError) as e:
        log.error("%s", e)
        if multirun:  # a failed job never blocks the rest of a sweep; its result.json says failed
            return None
        sys.exit(2)
    except Exception:
        if multirun:
            log.exception("job failed (recorded in result.json); continuing the sweep")
            return None
        raise
    ppl = result.get("ppl", {})
    log.info("result: %s", {k: round(v, 4) for k, v in ppl.items()})
    return next(iter(ppl.values()), None)


if __name__ == "__main__":
    main()
