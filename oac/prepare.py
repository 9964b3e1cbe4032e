"""`python -m oac.prepare`: one-time preparation run by `make setup` (convert the embedded GGUF model)."""

from __future__ import annotations

import logging
import os

from omegaconf import OmegaConf

from oac.models import resolve_model_dir

log = logging.getLogger("oac.prepare")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mcfg = OmegaConf.load(os.path.join(here, "configs", "model", "smollm2-135m.yaml"))
    cache = os.environ.get("OAC_CACHE", os.path.join(here, ".cache"))
    log.info("embedded model ready at %s", resolve_model_dir(mcfg, cache))


if __name__ == "__main__":
    main()
