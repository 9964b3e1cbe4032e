"""Any local text as an evaluation set, token budgets, and what a result records next to every number."""

from __future__ import annotations

import json

import pytest
import torch

from oac.data.tokens import eval_set
from oac.errors import ConfigError
from oac.eval.perplexity import eval_windows, perplexity
from oac.job import run_job, validate

TINY = ["model=stories260k", "calib.nsamples=4", "calib.seqlen=32", "eval.ppl.seqlen=64", "eval.ppl.max_windows=3"]

PARAGRAPHS = ["Once upon a time there was a little girl named Lily.\nShe liked to play outside.",
              "One day she found a red ball in the park. She was very happy.",
              "Her mom said: \"Let's go home now.\" Lily smiled and took the ball with her."] * 6


def _txt(tmp_path, name="story"):
    p = tmp_path / f"{name}.txt"
    p.write_text("\n\n\n".join(f"  {x}  " for x in PARAGRAPHS) + "\n", encoding="utf-8")
    return p


def test_local_txt_is_keyed_by_its_stem_and_scored_like_the_text_itself(compose, tmp_path, stories, single_thread):
    path = _txt(tmp_path)
    r = run_job(compose(*TINY, "method=fp16", f"eval.ppl.datasets=[wikitext2,{path}]"), tmp_path / "job")
    assert list(r["ppl"]) == ["wikitext2", "story"]
    model, tok = stories
    ids = torch.tensor(tok("\n\n".join(PARAGRAPHS)).input_ids).unsqueeze(0)
    direct = perplexity(model, ids, 64, max_windows=3)
    assert r["ppl"]["story"] == pytest.approx(direct["ppl"], rel=1e-6)
    d = r["ppl_details"]["story"]
    assert d["n_windows"] == direct["n_windows"] and d["sha256"] and d["source"] == str(path)


def test_jsonl_and_named_entries(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in PARAGRAPHS) + "\n")
    assert eval_set(str(p)) == ("docs", str(p))
    assert eval_set(f"mine={p}") == ("mine", str(p))
    assert eval_set("wikitext2") == ("wikitext2", "wikitext2")
    with pytest.raises(ConfigError, match="unknown perplexity dataset"):
        eval_set("wikitext3")
    with pytest.raises(ConfigError, match="does not exist"):
        eval_set(str(tmp_path / "missing.txt"))


def test_two_sets_with_one_name_are_refused_before_the_model_loads(compose, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _txt(tmp_path / "a"), _txt(tmp_path / "b")
    with pytest.raises(ConfigError, match="both called 'story'"):
        validate(compose(*TINY, "method=fp16", f"eval.ppl.datasets=[{a},{b}]"))


def test_token_budget_picks_the_first_windows():
    ids = torch.arange(1000).unsqueeze(0)
    w, total = eval_windows(ids, 100, max_tokens=350)
    assert w.shape == (3, 100) and total == 10 and int(w[2, -1]) == 299
    assert eval_windows(ids, 100, max_windows=2, max_tokens=350)[0].shape == (2, 100)
    with pytest.raises(ValueError, match="no window"):
        eval_windows(ids, 100, max_tokens=99)


def test_result_records_kl_windows_and_environment(compose, tmp_path, single_thread):
    r = run_job(compose(*TINY, "method=rtn", "method.wbits=3", "eval.ppl.datasets=[wikitext2]",
                        "eval.ppl.max_windows=null", "eval.ppl.max_tokens=200", "threads=1"), tmp_path / "job")
    assert r["ppl_details"]["wikitext2"]["n_windows"] == 3 and r["ppl_details"]["wikitext2"]["max_tokens"] == 200
    assert r["kl_details"]["wikitext2"]["n_windows"] == 3 and r["kl_details"]["wikitext2"]["n_predicted"] == 3 * 63
    assert r["kl"]["wikitext2"] > 0 and 0 < r["top1_agreement"]["wikitext2"] < 1
    env = r["environment"]
    assert env["cpu"] and env["threads"] == 1 and "BLAS" in env["torch_config"]


def test_a_complete_result_without_the_requested_kl_is_rerun(compose, tmp_path, single_thread):
    job = tmp_path / "job"
    base = [*TINY, "method=rtn", "method.wbits=3", "eval.ppl.datasets=[wikitext2]"]
    a = run_job(compose(*base, "eval.kl.datasets=[]"), job)
    assert "kl" not in a
    assert run_job(compose(*base, "eval.kl.datasets=[]"), job).get("skipped")
    b = run_job(compose(*base), job)
    assert not b.get("skipped") and b["config_hash"] == a["config_hash"] and "wikitext2" in b["kl"]
    assert b["ppl"] == a["ppl"]
    assert run_job(compose(*base), job).get("skipped")
