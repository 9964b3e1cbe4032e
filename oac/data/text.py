"""Raw text of the corpora, from the local mirrors in ``paths.data_dir`` or from the Hugging Face hub.

Both sources give the same schema (a list of strings, one per HF row). Rule: a local file is used
whenever it exists under ``data_dir``; otherwise the hub is tried, unless ``HF_HUB_OFFLINE`` or
``HF_DATASETS_OFFLINE`` is set, in which case a clear error names the missing file.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from oac.errors import ConfigError

log = logging.getLogger(__name__)

# name -> (local file relative to data_dir, text column, hub load_dataset kwargs or None)
CORPORA = {
    "wikitext2-test": ("wikitext2/wikitext-2-raw-v1.test.jsonl", "text",
                       dict(path="wikitext", name="wikitext-2-raw-v1", split="test")),
    "c4-validation": ("c4/c4-validation-2k.jsonl", "text",
                      dict(path="allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                           split="validation")),
    "c4-calibration": ("c4/c4-calibration-exllamav2.jsonl", "text",
                       dict(path="allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                            split="train")),
    "ptb-test": ("ptb/ptb.test.jsonl", "sentence", None),
    "ptb-valid": ("ptb/ptb.valid.jsonl", "sentence", None),
}


def offline() -> bool:
    return any(os.environ.get(v, "0") not in ("0", "", "false", "False") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def corpus_path(name: str, data_dir: str | os.PathLike | None) -> Path | None:
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}")
    if data_dir is None:
        return None
    p = Path(data_dir) / CORPORA[name][0]
    return p if p.exists() else None


def check_available(name: str, data_dir) -> str:
    """Fail fast (before any heavy work) if a corpus can be read neither locally nor from the hub."""
    p = corpus_path(name, data_dir)
    if p is not None:
        return f"local:{p}"
    rel, _, hub = CORPORA[name]
    if hub is None or offline():
        raise ConfigError(
            f"missing local data file {Path(data_dir or '<unset>') / rel} for {name!r}"
            + (" and the hub is offline" if hub is not None else " (no hub mirror exists for it)")
            + "; set paths.data_dir=/path/to/shared/data (the folder holding wikitext2/, c4/, ptb/, zeroshot/)"
        )
    return f"hub:{hub['path']}"


def load_rows(name: str, data_dir) -> list[str]:
    """All rows of a corpus as strings, in source order."""
    source = check_available(name, data_dir)
    return list(_load_rows_cached(name, source))


@lru_cache(maxsize=8)
def _load_rows_cached(name: str, source: str) -> tuple[str, ...]:
    col = CORPORA[name][1]
    if source.startswith("local:"):
        with open(source[len("local:"):], encoding="utf-8") as f:
            return tuple(json.loads(line)[col] for line in f)
    import datasets

    log.info("loading %s from the hub (%s)", name, source)
    ds = datasets.load_dataset(**CORPORA[name][2])
    return tuple(ds[col])
