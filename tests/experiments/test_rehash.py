"""experiments.rehash: committed results carry the hash the current identity rules give their stored config."""

import json

from experiments.rehash import rehash, rehash_tree
from oac.jobdir.identity import config_hash
from tests.helpers import ROOT


def test_every_committed_result_hashes_as_its_stored_config():
    """A stale hash makes a committed job unreusable and its table refuse a rerun (experiments.collect): after an
    identity-rule change, ``python -m experiments.rehash results/raw --write`` must have been run."""
    changed, _ = rehash_tree(ROOT / "results" / "raw")
    assert not changed, [str(p.parent.relative_to(ROOT)) for p in changed[:5]]


def test_rehash_rewrites_only_the_hashes(tmp_path):
    cfg = {"tag": "b", "model": {"name": "m"}, "method": {"name": "guided_gptq", "guided": {"groups": 2,
                                                                                           "cache_dir": "/x"}}}
    job = tmp_path / "job"
    job.mkdir()
    old = {"status": "complete", "config": cfg, "config_hash": "stale", "ppl": {"wikitext2": 12.5},
           "reused_from": {"job_dir": "/a", "tag": "a", "config_hash": "stale-too"}}
    (job / "result.json").write_text(json.dumps(old))
    assert rehash_tree(tmp_path) == ([job / "result.json"], [])  # reported, not written
    assert json.loads((job / "result.json").read_text()) == old
    rehash_tree(tmp_path, write=True)
    new = json.loads((job / "result.json").read_text())
    assert new["config_hash"] == config_hash(cfg) == config_hash({**cfg, "method": {
        "name": "guided_gptq", "guided": {"groups": 2, "cache_dir": "/elsewhere"}}})
    assert new["reused_from"] == {"job_dir": "/a", "tag": "a", "config_hash": config_hash({**cfg, "tag": "a"})}
    assert {k: v for k, v in new.items() if k not in ("config_hash", "reused_from")} == \
        {k: v for k, v in old.items() if k not in ("config_hash", "reused_from")}
    assert rehash(new) == new and rehash_tree(tmp_path) == ([], [])
