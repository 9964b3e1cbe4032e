"""Protocol checks on the real local data (PROTOCOLS.md §1-2, data/README.md)."""

import hashlib

import pytest
import torch
from omegaconf import OmegaConf

from oac.data.text import load_rows
from oac.data.tokens import calibration_windows, eval_stream
from oac.errors import ConfigError


def test_wikitext2_rows_and_join(data_dir):
    rows = load_rows("wikitext2-test", data_dir)
    assert len(rows) == 4358
    joined = "\n\n".join(rows)
    assert len(joined) == 1_294_336
    assert hashlib.sha256(joined.encode()).hexdigest() == \
        "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def test_ptb_and_c4_counts(data_dir):
    assert len(load_rows("ptb-test", data_dir)) == 3761
    assert len(load_rows("ptb-valid", data_dir)) == 3370
    assert len(load_rows("c4-calibration", data_dir)) == 118
    assert len(load_rows("c4-validation", data_dir)) == 2000


def _ccfg(**kw):
    base = dict(dataset="c4", nsamples=8, seqlen=128, seed=0, sampling="doc", sep="\n\n", accept="ge")
    base.update(kw)
    return OmegaConf.create(base)


@pytest.mark.parametrize("sampling", ["doc", "concat"])
def test_calibration_deterministic_per_seed(stories, data_dir, sampling):
    _, tok = stories
    a = calibration_windows(tok, _ccfg(sampling=sampling), data_dir=data_dir)
    b = calibration_windows(tok, _ccfg(sampling=sampling), data_dir=data_dir)
    c = calibration_windows(tok, _ccfg(sampling=sampling, seed=1), data_dir=data_dir)
    assert a.shape == (8, 128) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_doc_mode_matches_reference_sampler(stories, data_dir):
    """Re-implement the GPTQ sampler of PROTOCOLS.md §1.2 inline and compare windows."""
    import random

    _, tok = stories
    docs = load_rows("c4-calibration", data_dir)
    random.seed(3)
    expect = []
    for _ in range(4):
        while True:
            ids = tok(docs[random.randint(0, len(docs) - 1)]).input_ids
            if len(ids) >= 64:
                break
        s = random.randint(0, len(ids) - 64 - 1)
        expect.append(ids[s:s + 64])
    got = calibration_windows(tok, _ccfg(nsamples=4, seqlen=64, seed=3), data_dir=data_dir)
    assert got.tolist() == expect


def test_calibration_cache_roundtrip(stories, data_dir, tmp_path):
    _, tok = stories
    a = calibration_windows(tok, _ccfg(), data_dir=data_dir, cache_dir=tmp_path)
    assert list((tmp_path / "tokens").glob("calib-*.pt"))
    b = calibration_windows(tok, _ccfg(), data_dir=data_dir, cache_dir=tmp_path)
    assert torch.equal(a, b)


def test_eval_streams(stories, data_dir):
    _, tok = stories
    wt = eval_stream(tok, "wikitext2", 512, data_dir=data_dir)
    rows = load_rows("wikitext2-test", data_dir)
    assert wt[0].tolist() == tok("\n\n".join(rows)).input_ids
    c4n = eval_stream(tok, "c4-new", 512, data_dir=data_dir)
    assert c4n.shape[1] == 256 * 512
    c4o = eval_stream(tok, "c4", 64, data_dir=data_dir)
    assert c4o.shape[1] == 256 * 64


def test_missing_data_is_a_clear_error(stories, tmp_path):
    _, tok = stories
    with pytest.raises(ConfigError, match=r"wikitext-2-raw-v1.test.jsonl.*paths.data_dir"):
        eval_stream(tok, "wikitext2", 512, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown perplexity dataset"):
        eval_stream(tok, "wikitext3", 512, data_dir=tmp_path)


def test_local_corpora_match_sha256sums(data_dir):
    """Every corpus file read here is listed in data/SHA256SUMS and verifies (data/README.md)."""
    from oac.data.text import CORPORA, data_checksums, source_digest

    sums = data_checksums(data_dir)
    assert sums is not None
    for name, (rel, _, _) in CORPORA.items():
        assert source_digest(name, data_dir) == sums[rel], name
