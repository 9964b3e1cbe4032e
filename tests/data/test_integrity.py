"""No silent wrong numbers from data: content-addressed caches, SHA256SUMS checks, one-line errors for bad files.

Synthetic corpora in tmp_path laid out like the shared data folder, tokenized with the stories260K tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import torch
from omegaconf import OmegaConf

from oac.data import text
from oac.data.text import CORPORA, check_available, file_digest, load_rows, source_digest
from oac.data.tokens import calibration_windows, eval_stream
from oac.errors import ConfigError

WT = CORPORA["wikitext2-test"][0]
C4 = CORPORA["c4-calibration"][0]


@pytest.fixture(scope="module")
def tok(shared_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_dir / "models" / "stories260K")


def _rows(n, seed=0):
    return [f" = Story {seed}-{i} = \n Once upon a time a little cat number {i} saw {seed * 7 + i} birds . \n"
            for i in range(n)]


def _write_jsonl(path, rows, col="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({col: r}) + "\n" for r in rows), encoding="utf-8")


def _write_sums(data_dir, *rels):
    lines = [f"{hashlib.sha256((data_dir / r).read_bytes()).hexdigest()}  ./{r}" for r in rels]
    (data_dir / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def _truncate_lines(path, keep):
    """Truncate in place (same inode) to the first ``keep`` lines: still valid JSON lines."""
    lines = path.read_bytes().splitlines(keepends=True)
    with open(path, "r+b") as f:
        f.truncate(sum(len(x) for x in lines[:keep]))


def _ccfg(**kw):
    base = dict(dataset="c4", nsamples=4, seqlen=16, seed=0, sampling="concat", sep="\n\n", accept="ge")
    base.update(kw)
    return OmegaConf.create(base)


# ---------------------------------------------------------------------------------------------
# (a) a data file truncated after a first tokenization


def test_truncated_file_listed_in_sums_fails_with_its_name(tok, tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write_jsonl(data / WT, _rows(40))
    _write_jsonl(data / C4, _rows(40, seed=1))
    _write_sums(data, WT, C4)
    eval_stream(tok, "wikitext2", 64, data_dir=data, cache_dir=cache)
    calibration_windows(tok, _ccfg(), data_dir=data, cache_dir=cache)
    _truncate_lines(data / WT, 20)
    _truncate_lines(data / C4, 20)

    for call in (lambda: eval_stream(tok, "wikitext2", 64, data_dir=data, cache_dir=cache),
                 lambda: check_available("wikitext2-test", data),
                 lambda: load_rows("wikitext2-test", data)):
        with pytest.raises(ConfigError, match=r"wikitext-2-raw-v1\.test\.jsonl does not match its checksum") as e:
            call()
        assert "\n" not in str(e.value) and "SHA256SUMS" in str(e.value)
    with pytest.raises(ConfigError, match=r"c4-calibration-exllamav2\.jsonl does not match its checksum"):
        calibration_windows(tok, _ccfg(), data_dir=data, cache_dir=cache)


@pytest.mark.parametrize("setup", ["sums-but-verify-off", "no-sums"])
def test_truncated_file_is_retokenized_never_reused(tok, tmp_path, setup):
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write_jsonl(data / WT, _rows(40))
    _write_jsonl(data / C4, _rows(40, seed=1))
    if setup == "no-sums":
        verify = True
    else:
        _write_sums(data, WT, C4)
        verify = False
    full = eval_stream(tok, "wikitext2", 64, data_dir=data, cache_dir=cache, verify=verify)
    cal = calibration_windows(tok, _ccfg(), data_dir=data, cache_dir=cache, verify=verify)
    _truncate_lines(data / WT, 20)
    _truncate_lines(data / C4, 20)

    short = eval_stream(tok, "wikitext2", 64, data_dir=data, cache_dir=cache, verify=verify)
    assert short[0].tolist() == tok("\n\n".join(_rows(20))).input_ids
    assert short.shape[1] < full.shape[1]
    cal2 = calibration_windows(tok, _ccfg(), data_dir=data, cache_dir=cache, verify=verify)
    assert not torch.equal(cal, cal2)
    assert len(list((cache / "tokens").glob("eval-wikitext2-*.pt"))) == 2
    assert len(list((cache / "tokens").glob("calib-*.pt"))) == 2
    # and the fresh entries are the ones reused
    again = eval_stream(tok, "wikitext2", 64, data_dir=data, cache_dir=cache, verify=verify)
    assert torch.equal(again, short)


def test_same_bytes_elsewhere_share_the_cache(tok, tmp_path):
    """Keys hold the content digest, not the path: a copied data folder hits the same entries."""
    cache = tmp_path / "cache"
    for d in ("a", "b"):
        _write_jsonl(tmp_path / d / WT, _rows(10))
    a = eval_stream(tok, "wikitext2", 64, data_dir=tmp_path / "a", cache_dir=cache)
    b = eval_stream(tok, "wikitext2", 64, data_dir=tmp_path / "b", cache_dir=cache)
    assert torch.equal(a, b)
    assert len(list((cache / "tokens").glob("*.pt"))) == 1


def test_file_not_listed_in_sums_is_used(tok, tmp_path, caplog):
    data = tmp_path / "data"
    _write_jsonl(data / WT, _rows(5))
    (data / "SHA256SUMS").write_text(f"{'0' * 64}  ./something/else.jsonl\n")
    with caplog.at_level(logging.DEBUG, logger="oac.data.text"):
        assert len(load_rows("wikitext2-test", data)) == 5
    assert "not listed" in caplog.text


def test_malformed_sums_file_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    _write_jsonl(data / WT, _rows(5))
    (data / "SHA256SUMS").write_text("not-a-digest  ./wikitext2/wikitext-2-raw-v1.test.jsonl\n")
    with pytest.raises(ConfigError, match=r"SHA256SUMS line 1 is not"):
        check_available("wikitext2-test", data)
    assert len(load_rows("wikitext2-test", data, verify=False)) == 5


def test_sums_binary_marker_and_plain_relative_paths(tmp_path):
    data = tmp_path / "data"
    _write_jsonl(data / WT, _rows(5))
    digest = hashlib.sha256((data / WT).read_bytes()).hexdigest()
    (data / "SHA256SUMS").write_text(f"{digest} *{WT}\n")
    assert source_digest("wikitext2-test", data) == digest
    (data / "SHA256SUMS").write_text(f"{'f' * 64}  {WT}\n")
    with pytest.raises(ConfigError, match="does not match its checksum"):
        source_digest("wikitext2-test", data)


# ---------------------------------------------------------------------------------------------
# (b) the digest memo


def test_digest_memo_rehashes_only_when_the_file_changes(tmp_path, monkeypatch):
    calls = []
    real = text._hash_file
    monkeypatch.setattr(text, "_hash_file", lambda p: calls.append(p) or real(p))
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"A" * 1000)
    d1 = file_digest(f)
    assert d1 == hashlib.sha256(b"A" * 1000).hexdigest()
    assert file_digest(f) == d1 and file_digest(str(f)) == d1 and len(calls) == 1  # memoized

    with open(f, "r+b") as h:  # truncated in place
        h.truncate(500)
    d2 = file_digest(f)
    assert d2 == hashlib.sha256(b"A" * 500).hexdigest() and len(calls) == 2

    # same size, same mtime restored by hand: ctime still moves, so it is hashed again
    st = os.stat(f)
    with open(f, "r+b") as h:
        h.write(b"B")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    d3 = file_digest(f)
    assert d3 == hashlib.sha256(b"B" + b"A" * 499).hexdigest() and len(calls) == 3


def test_rows_memo_follows_the_file(tmp_path):
    data = tmp_path / "data"
    _write_jsonl(data / WT, _rows(6))
    assert load_rows("wikitext2-test", data) == _rows(6)
    _write_jsonl(data / WT, _rows(3, seed=2))
    assert load_rows("wikitext2-test", data) == _rows(3, seed=2)


# ---------------------------------------------------------------------------------------------
# (c) unreadable or unparsable data files


def _one_line_error(call, *patterns):
    with pytest.raises(ConfigError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in patterns:
        assert p in msg, msg
    return msg


def test_truncated_jsonl_is_one_line_error_with_path(tmp_path):
    data = tmp_path / "data"
    _write_jsonl(data / WT, _rows(8))
    raw = (data / WT).read_bytes()
    (data / WT).write_bytes(raw[: len(raw) - 30])  # cut inside the last row
    msg = _one_line_error(lambda: load_rows("wikitext2-test", data), str(data / WT), "not valid JSON lines (line 8)")
    assert "truncated" in msg
    (data / WT).write_bytes(raw[:9])
    _one_line_error(lambda: load_rows("wikitext2-test", data), str(data / WT), "(line 1)")


def test_other_bad_data_files_are_one_line_errors(tmp_path):
    data = tmp_path / "data"
    (data / WT).parent.mkdir(parents=True)
    (data / WT).write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "\xff\xfe"}\n')
    _one_line_error(lambda: load_rows("wikitext2-test", data), str(data / WT), "not valid UTF-8")
    _write_jsonl(data / WT, ["a", "b"], col="sentence")
    _one_line_error(lambda: load_rows("wikitext2-test", data), str(data / WT), "line 1 has no 'text' field")
    (data / WT).write_text('{"text": "a"}\n\n{"text": "b"}\n')
    _one_line_error(lambda: load_rows("wikitext2-test", data), str(data / WT), "(line 2)")
    (data / WT).unlink()
    (data / WT).mkdir()  # exists but cannot be read as a file
    _one_line_error(lambda: load_rows("wikitext2-test", data), str(data / WT), "cannot be read")


# ---------------------------------------------------------------------------------------------
# (d) corrupt token cache entries; atomic writes


@pytest.mark.parametrize("garbage", ["bytes", "half", "wrong-shape"])
def test_corrupt_cache_entry_is_moved_aside_and_rebuilt(tok, tmp_path, caplog, garbage):
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write_jsonl(data / C4, _rows(30, seed=3))
    a = calibration_windows(tok, _ccfg(), data_dir=data, cache_dir=cache)
    (entry,) = (cache / "tokens").glob("calib-*.pt")
    if garbage == "bytes":
        entry.write_bytes(b"\x00garbage, not a torch file" * 10)
    elif garbage == "half":
        raw = entry.read_bytes()
        entry.write_bytes(raw[: len(raw) // 2])
    else:
        torch.save(torch.zeros(2, 3, dtype=torch.long), entry)
    with caplog.at_level(logging.WARNING, logger="oac.data.tokens"):
        b = calibration_windows(tok, _ccfg(), data_dir=data, cache_dir=cache)
    assert torch.equal(a, b)
    aside = list((cache / "tokens").glob(f"{entry.name}.corrupt-*"))
    assert len(aside) == 1 and aside[0].name.split(".corrupt-")[1].isdigit()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage() and entry.name in warnings[0].getMessage()
    assert torch.equal(torch.load(entry), a)  # rebuilt entry under the final name


def test_cache_write_is_atomic(tok, tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write_jsonl(data / WT, _rows(10))
    real_save = torch.save

    def crash(t, f, *a, **k):  # a half-written file, then the disk is full
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    ids = eval_stream(tok, "wikitext2", 64, data_dir=data, cache_dir=cache)  # still computed, just not cached
    assert list((cache / "tokens").iterdir()) == []  # neither a final-name file nor a temporary left behind
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(eval_stream(tok, "wikitext2", 64, data_dir=data, cache_dir=cache), ids)
    assert [p.suffix for p in (cache / "tokens").iterdir()] == [".pt"]


# ---------------------------------------------------------------------------------------------
# converted-model cache (GGUF -> HF folder)


def test_gguf_conversion_is_keyed_by_the_gguf_bytes(tmp_path, monkeypatch, caplog):
    from oac import models

    converted = []

    def fake_convert(gdir, gguf_file, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes((gdir / gguf_file).read_bytes())
        converted.append(out)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    gdir, cache = tmp_path / "gguf", tmp_path / "cache"
    gdir.mkdir()
    (gdir / "m.gguf").write_bytes(b"GGUF version one")
    mcfg = OmegaConf.create(dict(name="tiny", source="gguf", path=str(gdir), gguf_file="m.gguf"))

    p1 = models.resolve_model_dir(mcfg, cache)
    assert models.resolve_model_dir(mcfg, cache) == p1 and len(converted) == 1
    stamp = json.loads((cache / "models" / os.path.basename(p1) / models.STAMP).read_text())
    assert stamp["sha256"] == hashlib.sha256(b"GGUF version one").hexdigest()
    assert not [p for p in (cache / "models").iterdir() if ".tmp-" in p.name]

    with open(gdir / "m.gguf", "r+b") as f:  # replaced in place by a different model
        f.write(b"GGUF version TWO")
    p2 = models.resolve_model_dir(mcfg, cache)
    assert p2 != p1 and len(converted) == 2
    assert (cache / "models" / os.path.basename(p2) / "model.safetensors").read_bytes() == b"GGUF version TWO"

    (cache / "models" / os.path.basename(p2) / models.STAMP).unlink()  # e.g. a half-copied folder
    with caplog.at_level(logging.WARNING, logger="oac.models"):
        assert models.resolve_model_dir(mcfg, cache) == p2
    assert len(converted) == 3 and "moved aside" in caplog.text
    assert list((cache / "models").glob(os.path.basename(p2) + ".corrupt-*"))
