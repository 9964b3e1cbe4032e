"""Raw text of the corpora, from the local mirrors in ``paths.data_dir`` or from the Hugging Face hub.

Both sources give the same schema (a list of strings, one per HF row). Rule: a local file is used
whenever it exists under ``data_dir``; otherwise the hub is tried, unless ``HF_HUB_OFFLINE`` or
``HF_DATASETS_OFFLINE`` is set, in which case a clear error names the missing file.

Integrity: every local file is identified by the sha256 of its bytes (:func:`file_digest`, hashed once
per process and file state), and caches built from it are keyed by that digest. When ``data_dir`` holds a
``SHA256SUMS`` (``sha256sum`` format), each file read is checked against it once per process unless
``verify=False``; a mismatch is a :class:`ConfigError` naming the file. A file that cannot be read or
parsed is a one-line :class:`ConfigError` with its path and the reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
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
SUMS_FILE = "SHA256SUMS"
_CHUNK = 1 << 20


def offline() -> bool:
    """True when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set to a true value (huggingface_hub's rule:
    1/true/yes/on, any case); the one offline check of the project."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# ---------------------------------------------------------------------------------------------
# content digests


def _state(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies one version of a file without reading it (ctime catches an mtime reset by hand)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


# (resolved path, size, mtime_ns, ctime_ns, inode) -> sha256 hex of the bytes
_DIGESTS: dict[tuple, str] = {}


def _memo_key(path: Path, st: os.stat_result) -> tuple:
    return (str(path), *_state(st))


def _read_error(path, e: OSError) -> ConfigError:
    return ConfigError(f"data file {path} cannot be read: {e.strerror or e}")


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, hashed once per process for each (path, size, mtime, ctime, inode).

    A file that changes while it is hashed is hashed again, so the digest always belongs to one state.
    """
    p = Path(path).resolve()
    for _ in range(3):
        try:
            before = os.stat(p)
            key = _memo_key(p, before)
            if key in _DIGESTS:
                return _DIGESTS[key]
            digest = _hash_file(p)
            after = os.stat(p)
        except OSError as e:
            raise _read_error(path, e) from None
        if _state(before) == _state(after):
            _DIGESTS[key] = digest
            return digest
    raise ConfigError(f"data file {path} keeps changing while it is being hashed")


def _bytes_digest(path: Path, data: bytes, st: os.stat_result) -> str:
    """Digest of bytes just read from ``path`` (stat taken before the read); memoized like file_digest."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        if _state(os.stat(path)) == _state(st) and len(data) == st.st_size:
            _DIGESTS[_memo_key(path, st)] = digest
    except OSError:
        pass
    return digest


# ---------------------------------------------------------------------------------------------
# SHA256SUMS


@lru_cache(maxsize=16)
def _parse_sums(sums_path: str, state: tuple) -> dict[str, str]:
    """relative path (no leading ./) -> expected sha256 hex, from a `sha256sum` output file."""
    out: dict[str, str] = {}
    try:
        with open(sums_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"checksum file {sums_path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 1)
        hexd = parts[0].lower()
        if len(parts) != 2 or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
            raise ConfigError(f"checksum file {sums_path} line {i} is not `<sha256>  <path>`: {line[:80]!r}")
        name = parts[1]
        if name.startswith("*"):  # sha256sum binary-mode marker
            name = name[1:]
        out[os.path.normpath(name)] = hexd
    return out


def data_checksums(data_dir) -> dict[str, str] | None:
    """The parsed ``data_dir/SHA256SUMS`` (normalized relative path -> sha256 hex), or None if there is none."""
    if data_dir is None:
        return None
    sums = Path(data_dir) / SUMS_FILE
    try:
        st = os.stat(sums)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"checksum file {sums} cannot be read: {e.strerror or e}") from None
    return _parse_sums(str(sums.resolve()), _state(st))


def _expected_digest(path: Path, data_dir) -> str | None:
    sums = data_checksums(data_dir)
    if sums is None:
        return None
    root = Path(data_dir)
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        try:
            rel = Path(path).resolve().relative_to(root.resolve())
        except ValueError:
            return None
    exp = sums.get(os.path.normpath(str(rel)))
    if exp is None:
        log.debug("%s is not listed in %s; not verified", path, root / SUMS_FILE)
    return exp


def _check_digest(path: Path, data_dir, digest: str) -> None:
    exp = _expected_digest(path, data_dir)
    if exp is not None and exp != digest:
        raise ConfigError(
            f"data file {path} does not match its checksum in {Path(data_dir) / SUMS_FILE} "
            f"(sha256 {digest[:12]}..., expected {exp[:12]}...): the file is modified or truncated; "
            "restore it, or set paths.verify_data=false to use it as it is"
        )


def verify_file(path: str | os.PathLike, data_dir) -> str:
    """Check a file under ``data_dir`` against ``data_dir/SHA256SUMS`` (if listed); returns its digest.

    Hashing is memoized per file state, so repeated checks in one process cost a stat.
    """
    digest = file_digest(path)
    _check_digest(Path(path), data_dir, digest)
    return digest


# ---------------------------------------------------------------------------------------------
# corpora


def corpus_path(name: str, data_dir: str | os.PathLike | None) -> Path | None:
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}")
    if data_dir is None:
        return None
    p = Path(data_dir) / CORPORA[name][0]
    return p if p.exists() else None


def check_available(name: str, data_dir, *, verify: bool = True) -> str:
    """Fail fast (before any heavy work) if a corpus can be read neither locally nor from the hub.

    A local file is also checked against ``data_dir/SHA256SUMS`` when ``verify`` (cheap after the first call).
    """
    p = corpus_path(name, data_dir)
    if p is not None:
        if verify:
            verify_file(p, data_dir)
        return f"local:{p}"
    rel, _, hub = CORPORA[name]
    if hub is None or offline():
        raise ConfigError(
            f"missing local data file {Path(data_dir or '<unset>') / rel} for {name!r}"
            + (" and the hub is offline" if hub is not None else " (no hub mirror exists for it)")
            + "; set paths.data_dir=/path/to/shared/data (the folder holding wikitext2/, c4/, ptb/, zeroshot/)"
        )
    return f"hub:{hub['path']}"


def source_digest(name: str, data_dir, *, verify: bool = True) -> str | None:
    """sha256 of the local file a corpus is read from (verified if ``verify``), or None for a hub source."""
    source = check_available(name, data_dir, verify=False)
    if not source.startswith("local:"):
        return None
    p = Path(source[len("local:"):])
    return verify_file(p, data_dir) if verify else file_digest(p)


def read_corpus(name: str, data_dir, *, verify: bool = True) -> tuple[list[str], str | None]:
    """(rows, sha256 of the exact bytes they were parsed from; None for a hub source)."""
    source = check_available(name, data_dir, verify=False)
    if not source.startswith("local:"):
        return list(_load_hub_rows(name, source)), None
    shown = Path(source[len("local:"):])
    path = shown.resolve()
    try:
        st = os.stat(path)
    except OSError as e:
        raise _read_error(shown, e) from None
    key = _memo_key(path, st)
    digest = _DIGESTS.get(key)
    rows = _rows_by_digest(name, digest) if digest is not None else None
    if rows is None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise _read_error(shown, e) from None
        digest = _bytes_digest(path, data, st)
        rows = _parse_jsonl(shown, data, CORPORA[name][1])
        _ROWS[(name, digest)] = rows
        while len(_ROWS) > 8:
            _ROWS.pop(next(iter(_ROWS)))
    if verify:
        _check_digest(shown, data_dir, digest)
    return list(rows), digest


def load_rows(name: str, data_dir, *, verify: bool = True) -> list[str]:
    """All rows of a corpus as strings, in source order (local file checked against SHA256SUMS if ``verify``)."""
    return read_corpus(name, data_dir, verify=verify)[0]


# (corpus name, sha256 of the file) -> rows; a few corpora, insertion-ordered for eviction
_ROWS: dict[tuple[str, str], tuple[str, ...]] = {}


def _rows_by_digest(name: str, digest: str) -> tuple[str, ...] | None:
    return _ROWS.get((name, digest))


def _parse_jsonl(path: Path, data: bytes, col: str) -> tuple[str, ...]:
    """Rows of a JSON-lines file, split exactly like iterating a text-mode file (universal newlines)."""
    rows = []
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    i = 0
    try:
        for i, line in enumerate(text, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"data file {path} is not valid JSON lines (line {i}): {e.msg} at column {e.colno}"
                    + (" (truncated file?)" if i > 1 and not line.endswith("\n") else "")
                ) from None
            if not isinstance(obj, dict) or col not in obj:
                raise ConfigError(f"data file {path} line {i} has no {col!r} field (got {type(obj).__name__})")
            rows.append(obj[col])
    except UnicodeDecodeError as e:
        raise ConfigError(f"data file {path} is not valid UTF-8 (after line {i}): {e.reason}") from None
    return tuple(rows)


@lru_cache(maxsize=8)
def _load_hub_rows(name: str, source: str) -> tuple[str, ...]:
    import datasets

    log.info("loading %s from the hub (%s)", name, source)
    ds = datasets.load_dataset(**CORPORA[name][2])
    return tuple(ds[CORPORA[name][1]])


# --- any local text as an evaluation set -------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".jsonl")


def local_text(path: str | os.PathLike) -> tuple[str, str]:
    """(text, sha256 of the bytes it was parsed from) of a user's evaluation file.

    ``.txt``: UTF-8 paragraphs (blocks separated by blank lines, each stripped) joined by "\\n\\n", as the GPTQ
    protocol joins WikiText2's rows; ``.jsonl``: the ``text`` field of every line, joined the same way.
    """
    p = Path(path)
    if p.suffix not in TEXT_SUFFIXES:
        raise ConfigError(f"evaluation text {p} must be a .txt or .jsonl file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise _read_error(p, e) from None
    digest = hashlib.sha256(data).hexdigest()
    if p.suffix == ".jsonl":
        rows = [r for r in _parse_jsonl(p, data, "text")]
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"evaluation text {p} is not valid UTF-8 (byte {e.start}): {e.reason}") from None
        rows = [b.strip() for b in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
        rows = [b for b in rows if b]
    if not rows:
        raise ConfigError(f"evaluation text {p} holds no text")
    return "\n\n".join(rows), digest
