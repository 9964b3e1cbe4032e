"""Token streams for perplexity and calibration windows, exactly as PROTOCOLS.md §1.2 and §2 describe.

Tokenized data is cached on disk under ``cache_dir/tokens``; keys include the tokenizer's
fingerprint, the sha256 of the source file's bytes (:func:`oac.data.text.source_digest`) and every
protocol parameter, so a changed tokenizer or a changed data file never hits a stale entry. Writes are
atomic (temporary file + ``os.replace``); an entry that cannot be read is moved aside and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import torch

from oac.data.text import TEXT_SUFFIXES, check_available, local_text, read_corpus, source_digest
from oac.errors import ConfigError
from oac.io import atomic_write, quarantine
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


def _one_line(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _cached(cache_dir, key: dict, build, check=None):
    """Load a tensor from the token cache, or build and store it (atomic write).

    ``check(t)`` returns an error string for a loaded tensor of the wrong kind/shape (treated like a corrupt
    file: moved aside to ``<name>.corrupt-<unix time>`` and rebuilt).
    """
    if cache_dir is None:
        return build()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "tokens" / f"{key['kind']}-{digest}.pt"
    if path.exists():
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
            why = None
            if not isinstance(t, torch.Tensor) or t.dtype != torch.long:
                why = f"holds {type(t).__name__} {getattr(t, 'dtype', '')}, not a long tensor"
            elif check is not None:
                why = check(t)
        except FileNotFoundError:
            why = ""
        except Exception as e:  # noqa: BLE001 - any unreadable file is a cache miss, never a result
            why = _one_line(e)
        if why is None:
            return t
        if why:
            quarantine(path, why)
    t = build()
    try:
        atomic_write(path, lambda tmp: torch.save(t, tmp))
    except OSError as e:
        log.warning("could not write token cache entry %s (%s); continuing without it", path, _one_line(e))
    return t


def _source(corpus: str, data_dir, verify: bool) -> tuple[str, str | None]:
    """(cache-key source, sha256 of the local file or None for the hub): local data is keyed by content."""
    src = check_available(corpus, data_dir, verify=verify)
    digest = source_digest(corpus, data_dir, verify=False) if src.startswith("local:") else None
    return (f"sha256:{digest}" if digest else src), digest


def _rows(corpus: str, data_dir, verify: bool, digest: str | None) -> list[str]:
    """Rows of the corpus, guaranteed to be parsed from the bytes whose digest is in the cache key."""
    rows, got = read_corpus(corpus, data_dir, verify=verify)
    if got != digest:
        raise ConfigError(f"data file for {corpus!r} under {data_dir} changed while it was being read; run again")
    return rows


def eval_set(entry: str) -> tuple[str, str]:
    """(key in result.json and tables, source) of an ``eval.ppl.datasets`` entry: a built-in protocol name, a path
    to a local ``.txt`` / ``.jsonl`` (key: the file's stem) or ``name=path``. Raises ConfigError for anything else."""
    entry = str(entry)
    if entry in PPL_DATASETS:
        return entry, entry
    name, sep, path = entry.partition("=")
    if not sep:
        name, path = Path(entry).stem, entry
    if Path(path).suffix not in TEXT_SUFFIXES:
        raise ConfigError(f"unknown perplexity dataset {entry!r}; known: {list(PPL_DATASETS)}, or a path to a "
                          ".txt / .jsonl file (optionally name=path)")
    if not name or name in PPL_DATASETS:
        raise ConfigError(f"evaluation text {entry!r}: its key {name!r} must be non-empty and not a built-in set name")
    if not Path(path).is_file():
        raise ConfigError(f"evaluation text {path} does not exist")
    return name, path


def text_stream(tok, path, *, cache_dir=None) -> tuple[torch.Tensor, str]:
    """([1, L] token ids, sha256 of the file) of a local evaluation text (:func:`oac.data.text.local_text`), cached
    by content digest like the built-in corpora."""
    text, digest = local_text(path)
    key = {"kind": "eval-text", "tok": tokenizer_fingerprint(tok), "src": f"sha256:{digest}", "v": 1}
    ids = _cached(cache_dir, key, lambda: torch.tensor(_encode(tok, text), dtype=torch.long).unsqueeze(0),
                  lambda t: None if t.dim() == 2 and t.shape[0] == 1 else f"shape {list(t.shape)}, expected [1, L]")
    return ids, digest


def eval_source(name: str) -> str:
    return {"wikitext2": "wikitext2-test", "c4-new": "c4-validation", "c4": "c4-validation",
            "ptb": "ptb-valid", "ptb-new": "ptb-test"}[name]


def eval_stream(tok, name: str, seqlen: int, *, data_dir, cache_dir=None, verify: bool = True) -> torch.Tensor:
    """[1, L] token ids of a perplexity corpus under the named protocol variant.

    ``verify``: check the local file against ``data_dir/SHA256SUMS`` (``paths.verify_data``).
    """
    if name not in PPL_DATASETS:
        raise ConfigError(f"unknown perplexity dataset {name!r}; known: {list(PPL_DATASETS)}")
    src, digest = _source(eval_source(name), data_dir, verify)
    key = {"kind": f"eval-{name}", "tok": tokenizer_fingerprint(tok), "src": src, "v": 1,
           "seqlen": seqlen if name in ("c4", "c4-new") else None}

    def build():
        rows = _rows(eval_source(name), data_dir, verify, digest)
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

    def check(t):
        if t.dim() != 2 or t.shape[0] != 1:
            return f"shape {list(t.shape)}, expected [1, L]"
        return None

    return _cached(cache_dir, key, build, check)


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


def calibration_windows(tok, ccfg, *, data_dir, cache_dir=None, verify: bool = True) -> torch.Tensor:
    """[nsamples, seqlen] calibration token ids. ``ccfg`` has dataset, nsamples, seqlen, seed, sampling, sep.

    ``verify``: check the local file against ``data_dir/SHA256SUMS`` (``paths.verify_data``).
    """
    if ccfg.dataset not in CALIB_DATASETS:
        raise ConfigError(f"unknown calibration dataset {ccfg.dataset!r}; known: {sorted(CALIB_DATASETS)}")
    if ccfg.sampling not in ("doc", "concat"):
        raise ConfigError(f"calib.sampling must be 'doc' or 'concat', not {ccfg.sampling!r}")
    corpus = CALIB_DATASETS[ccfg.dataset]
    src, digest = _source(corpus, data_dir, verify)
    key = {"kind": "calib", "tok": tokenizer_fingerprint(tok), "src": src, "dataset": ccfg.dataset,
           "n": ccfg.nsamples, "seqlen": ccfg.seqlen, "seed": ccfg.seed, "sampling": ccfg.sampling,
           "sep": ccfg.sep, "accept": ccfg.get("accept", "ge"), "v": 1}

    def build():
        rows = _rows(corpus, data_dir, verify, digest)
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

    def check(t):
        if list(t.shape) != [ccfg.nsamples, ccfg.seqlen]:
            return f"shape {list(t.shape)}, expected [{ccfg.nsamples}, {ccfg.seqlen}]"
        return None

    return _cached(cache_dir, key, build, check)


def ids_checksum(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]
