"""experiments.collect copies complete results only and refuses to replace a committed job's configuration."""

from __future__ import annotations

import json

import pytest

from experiments.collect import collect


def _job(root, name, status, h, **extra):
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "result.json").write_text(json.dumps({"status": status, "config_hash": h, **extra}))


def test_only_complete_results_are_copied_and_a_changed_hash_is_refused(tmp_path):
    src, dst = tmp_path / "outputs" / "t", tmp_path / "raw" / "t"
    _job(src, "a", "complete", "h1")
    _job(src, "b", "running", "h2")
    _job(src, "c", "failed", "h3")
    assert collect(src, dst) == (1, 2)
    assert [p.name for p in dst.iterdir()] == ["a"]
    assert collect(src, dst) == (1, 2)  # idempotent
    (src / "a" / "result.json").write_text(json.dumps({"status": "complete", "config_hash": "other"}))
    with pytest.raises(SystemExit, match="config_hash h1"):
        collect(src, dst)


def test_a_copy_never_replaces_the_committed_original(tmp_path):
    """On a fresh clone a job is copied from results/raw itself (reuse_roots); collecting it back keeps the original."""
    src, dst = tmp_path / "outputs" / "t", tmp_path / "raw" / "t"
    _job(dst, "a", "complete", "h1", ppl={"w": 1.0})
    _job(src, "a", "complete", "h1", ppl={"w": 1.0}, reused_from={"job_dir": str(dst / "a")})
    _job(src, "b", "complete", "h2", reused_from={"job_dir": "elsewhere"})
    assert collect(src, dst) == (1, 1)
    assert "reused_from" not in json.loads((dst / "a" / "result.json").read_text())
    assert "reused_from" in json.loads((dst / "b" / "result.json").read_text())  # a copy with no original here is kept
