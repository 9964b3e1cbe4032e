"""Shared fixtures: where the shared assets are, tiny models, and composing the real Hydra configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, SHARED

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").exists():
        pytest.skip(f"shared assets not found at {SHARED} (set OAC_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def data_dir(shared_dir) -> Path:
    return shared_dir / "data"


@pytest.fixture(scope="session")
def stories(shared_dir):
    """(model, tokenizer) of the real stories260K checkpoint, fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_dir / "models" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture
def compose(tmp_path, shared_dir):
    """Compose the real configs with overrides (Hydra Compose API), outputs and caches under tmp_path."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return hcompose(config_name="config", overrides=[
                f"paths.shared_dir={shared_dir}", f"paths.cache_dir={ROOT / '.cache'}",
                f"paths.output_dir={tmp_path}", *overrides])

    return _compose


@pytest.fixture(scope="module")
def single_thread():
    """Small tensors: one intra-op thread avoids oversubscription on the 2-core machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
