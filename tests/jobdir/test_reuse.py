"""A result of the same configuration under another sweep's tag is copied, not recomputed (oac/jobdir/reuse.py)."""

from __future__ import annotations

import json

from oac.job import run_job
from oac.jobdir import config_hash
from oac.jobdir.identity import content_hash

TINY = ["model=stories260k", "calib.nsamples=4", "calib.seqlen=32", "eval.ppl.datasets=[wikitext2]",
        "eval.ppl.seqlen=128", "eval.ppl.max_windows=2", "threads=1", "method=gptq", "method.wbits=3"]


def test_same_config_under_another_tag_is_copied_with_its_origin(compose, tmp_path, single_thread):
    first = run_job(compose(*TINY, "tag=table_a"), tmp_path / "table_a" / "job")
    cfg_b = compose(*TINY, "tag=table_b")
    assert config_hash(cfg_b) != first["config_hash"] and content_hash(cfg_b) == content_hash(first["config"])
    second = run_job(cfg_b, tmp_path / "table_b" / "job")
    assert second.get("skipped") and second["reused_from"]["tag"] == "table_a"
    on_disk = json.loads((tmp_path / "table_b" / "job" / "result.json").read_text())
    assert on_disk["tag"] == "table_b" and on_disk["config_hash"] == config_hash(cfg_b)
    assert on_disk["ppl"] == first["ppl"] and on_disk["layers"] == first["layers"]
    assert on_disk["reused_from"]["job_dir"] == str(tmp_path / "table_a" / "job")
    # rerunning table_b skips its own (copied) complete result; reuse_results=false recomputes the same numbers
    assert run_job(cfg_b, tmp_path / "table_b" / "job").get("skipped")
    fresh = run_job(compose(*TINY, "tag=table_c", "reuse_results=false"), tmp_path / "table_c" / "job")
    assert not fresh.get("skipped") and "reused_from" not in fresh and fresh["ppl"] == first["ppl"]
    assert config_hash(compose(*TINY, "tag=table_c", "reuse_results=false")) == config_hash(compose(*TINY, "tag=table_c"))


def test_another_config_or_another_thread_count_is_not_reused(compose, tmp_path, single_thread):
    run_job(compose(*TINY, "tag=table_a"), tmp_path / "table_a" / "job")
    other = run_job(compose(*TINY, "tag=table_b", "method.wbits=4"), tmp_path / "table_b" / "w4")
    assert not other.get("skipped")
    path = tmp_path / "table_a" / "job" / "result.json"
    r = json.loads(path.read_text())
    r["environment"]["threads"] = 7  # as if computed with 7 threads: last bits may differ, so it is not reused
    path.write_text(json.dumps(r))
    again = run_job(compose(*TINY, "tag=table_c"), tmp_path / "table_c" / "job")
    assert not again.get("skipped") and "reused_from" not in again


def test_a_committed_result_under_reuse_roots_is_reused_by_a_fresh_output_dir(compose, tmp_path, single_thread):
    """A new clone has no outputs/ but has results/raw: a split sweep resumes from what was committed."""
    committed = tmp_path / "results" / "raw" / "table_a" / "job"
    first = run_job(compose(*TINY, "tag=table_a"), committed)
    roots = f"reuse_roots=[{tmp_path / 'results' / 'raw'}]"
    cfg = compose(*TINY, "tag=table_a", f"paths.output_dir={tmp_path / 'outputs'}", roots)
    again = run_job(cfg, tmp_path / "outputs" / "table_a" / "job")
    assert again.get("skipped") and again["reused_from"]["job_dir"] == str(committed)
    assert again["ppl"] == first["ppl"] and again["config_hash"] == first["config_hash"]
    assert config_hash(cfg) == config_hash(compose(*TINY, "tag=table_a", "reuse_roots=[]"))
    # without the committed root nothing is found: recomputed
    fresh = run_job(compose(*TINY, "tag=table_a", f"paths.output_dir={tmp_path / 'outputs2'}", "reuse_roots=[]"),
                    tmp_path / "outputs2" / "table_a" / "job")
    assert not fresh.get("skipped") and fresh["ppl"] == first["ppl"]
