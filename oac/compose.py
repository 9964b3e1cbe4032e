"""Run jobs in-process from override lists (Hydra Compose API): used by the demo, reports and tests."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_overrides(overrides: list[str], out_dir: str | os.PathLike) -> dict:
    from oac.job import run_job

    return run_job(compose_config(overrides), out_dir, overrides=list(overrides))
