"""Token streams for perplexity and calibration windows, exactly as PROTOCOLS.md §1.2 and §2 describe.

Tokenized data is cached on disk under ``cache_dir/tokens``; keys include the tokenizer's
fingerprint, the source and every protocol parameter, so a changed tokenizer never hits a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import torch

from oac.data.text import check_available, load_rows
from oac.errors import ConfigError
from oac.models import tokenizer_fingerprint

log = logging.getLogger(__name__)

PPL_DATASETS = ("wikitext2", "c4-new", "c4", "ptb", "ptb-new")
# Only sources disjoint from the evaluation text: no WikiText2 train split exists offline, and calibrating on
# the test split would leak the evaluation data (PROTOCOLS.md §5.10).
CALIB_DATASETS = {"c4": "c4-calibration", "c4-calib": "c4-calibration", "c4-val-heldout": "c4-validation"}
C4_NEW_DOCS = 1100  # first documents joined for the c4-new protocol
C4_WINDOWS = 256


def _encode(tok, text: str) -> list[int]:
    return tok(text).input_ids


def _cached(cache_dir, key: dict, build):
    """Load a tensor from the token cache, or build and store it (atomic write)."""
    if cache_dir is None:
        return build()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "tokens" / f"{key['kind']}-{digest}.pt"
    if path.exists():
        return torch.load(path)
    t = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{random.getrandbits(32)}")
    torch.save(t, tmp)
    tmp.replace(path)
    return t


def eval_source(name: str) -> str:
    return {"wikitext2": "wikitext2-test", "c4-new": "c4-validation", "c4": "c4-validation",
            "ptb": "ptb-valid", "ptb-new": "ptb-test"}[name]


def eval_stream(tok, name: str, seqlen: int, *, data_dir, cache_dir=None) -> torch.Tensor:
    """[1, L] token ids of a perplexity corpus under the named protocol variant."""
    if name not in PPL_DATASETS:
        raise ConfigError(f"unknown perplexity dataset {name!r}; known: {list(PPL_DATASETS)}")
    src = check_available(eval_source(name), data_dir)
    key = {"kind": f"eval-{name}", "tok": tokenizer_fingerprint(tok), "src": src, "v": 1,
           "seqlen": seqlen if name in ("c4", "c4-new") else None}

    def build():
        rows = load_rows(eval_source(name), data_dir)
        if name == "wikitext2":
            ids = _encode(tok, "\n\n".join(rows))
        elif name == "ptb":
            ids = _encode(tok, "\n\n".join(rows))
        elif name == "ptb-new":
            ids = _encode(tok, " ".join(rows))
        elif name == "c4-new":
            ids = _encode(tok, " ".join(rows[:C4_NEW_DOCS]))[: C4_WINDOWS * seqlen]
        else:  # old c4: 256 random windows from documents >= seqlen tokens, seed fixed at 0
            ids = _doc_windows(tok, rows, C4_WINDOWS, seqlen, seed=0, accept="ge", exact_whole=True)
            ids = [t for w in ids for t in w]
        return torch.tensor(ids, dtype=torch.long).unsqueeze(0)

    return _cached(cache_dir, key, build)


def _doc_windows(tok, docs, n, seqlen, *, seed, accept="ge", max_tries=100_000, exact_whole=False):
    """GPTQ document-rejection sampling (PROTOCOLS.md §1.2). Each document is tokenized alone (once)."""
    rng = random.Random(seed)
    encoded: dict[int, list[int]] = {}
    out = []
    for _ in range(n):
        for _try in range(max_tries):
            d = rng.randint(0, len(docs) - 1)
            if d not in encoded:
                encoded[d] = _encode(tok, docs[d])
            ids = encoded[d]
            if len(ids) > seqlen or (accept == "ge" and len(ids) == seqlen):
                break
        else:
            raise ConfigError(
                f"calibration: no document with {'>=' if accept == 'ge' else '>'} {seqlen} tokens after {max_tries} "
                "draws; use calib.sampling=concat or a smaller calib.seqlen"
            )
        if len(ids) == seqlen:  # randint(0, -1) would fail in the reference; take the whole document
            s = 0
        else:
            s = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[s : s + seqlen])
    return out


def calibration_windows(tok, ccfg, *, data_dir, cache_dir=None) -> torch.Tensor:
    """[nsamples, seqlen] calibration token ids. ``ccfg`` has dataset, nsamples, seqlen, seed, sampling, sep."""
    if ccfg.dataset not in CALIB_DATASETS:
        raise ConfigError(f"unknown calibration dataset {ccfg.dataset!r}; known: {sorted(CALIB_DATASETS)}")
    if ccfg.sampling not in ("doc", "concat"):
        raise ConfigError(f"calib.sampling must be 'doc' or 'concat', not {ccfg.sampling!r}")
    corpus = CALIB_DATASETS[ccfg.dataset]
    src = check_available(corpus, data_dir)
    key = {"kind": "calib", "tok": tokenizer_fingerprint(tok), "src": src, "dataset": ccfg.dataset,
           "n": ccfg.nsamples, "seqlen": ccfg.seqlen, "seed": ccfg.seed, "sampling": ccfg.sampling,
           "sep": ccfg.sep, "accept": ccfg.get("accept", "ge"), "v": 1}

    def build():
        rows = load_rows(corpus, data_dir)
        if ccfg.dataset == "c4-val-heldout":
            rows = rows[C4_NEW_DOCS:]  # disjoint from the documents c4-new evaluation uses
        if ccfg.sampling == "doc":
            wins = _doc_windows(tok, rows, ccfg.nsamples, ccfg.seqlen, seed=ccfg.seed, accept=ccfg.get("accept", "ge"))
        else:
            ids = _encode(tok, ccfg.sep.join(rows))
            if len(ids) <= ccfg.seqlen:
                raise ConfigError(f"calibration corpus has only {len(ids)} tokens (< seqlen {ccfg.seqlen})")
            rng = random.Random(ccfg.seed)
            wins = []
            for _ in range(ccfg.nsamples):
                s = rng.randint(0, len(ids) - ccfg.seqlen - 1)
                wins.append(ids[s : s + ccfg.seqlen])
        return torch.tensor(wins, dtype=torch.long)

    return _cached(cache_dir, key, build)


def ids_checksum(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]
