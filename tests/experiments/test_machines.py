"""The same jobs on two machines: matched by config_hash, the log-ratios and their spread vs the seed spread."""

import math

import pytest

from experiments.machines import compare, markdown
from oac.io import write_json_atomic
from tests.experiments.test_report import seeded


def test_cross_machine_log_ratios_and_spread(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ppl = {0: 100.0, 1: 120.0, 2: 90.0}
    for s, p in ppl.items():
        ra = seeded("spqr", s, {"wikitext2": p})
        ra["environment"] = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "threads": 1}
        ra["config_hash"] = f"h{s}"
        rb = seeded("spqr", s, {"wikitext2": p * (1.1 if s == 0 else 1.0)})  # seed 0 moves by 10%, others identical
        rb["environment"] = {"cpu": "Intel Xeon", "cpu_capability": "AVX512", "threads": 1}
        rb["config_hash"] = f"h{s}"
        write_json_atomic(a / str(s) / "result.json", ra)
        write_json_atomic(b / str(s) / "result.json", rb)
    rb = seeded("spqr", 3, {"wikitext2": 50.0})
    rb["config_hash"] = "only-on-b"
    write_json_atomic(b / "3" / "result.json", rb)
    per_job, spread = compare(a, b)
    assert len(per_job) == 3 and set(per_job["config_hash"]) == {"h0", "h1", "h2"}  # unmatched job left out
    r = spread.iloc[0]
    assert r["n_identical"] == 2 and r["max_abs_log_ratio"] == pytest.approx(math.log(1.1))
    assert r["rms_log_ratio"] == pytest.approx(math.log(1.1) / math.sqrt(3))
    logs = [math.log(v) for v in (110.0, 120.0, 90.0, 50.0)]  # B's seeds of the configuration, the unmatched one too
    mean = sum(logs) / 4
    assert r["n_configs_seed_sd"] == 1
    assert r["seed_sd_log"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in logs) / 3))
    md = markdown(per_job, spread, a, b)
    assert "AMD EPYC" in md and "Intel Xeon" in md and "+10.0%" in md


def test_a_job_from_the_same_environment_on_both_sides_is_not_a_cross_machine_pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root, cpu in ((a, "AMD EPYC"), (b, "Intel Xeon")):
        r = seeded("spqr", 0, {"wikitext2": 100.0 if root == a else 104.0})
        r["environment"] = {"cpu": cpu, "cpu_capability": "AVX2", "threads": 1}
        r["config_hash"] = "moved"
        write_json_atomic(root / "0" / "result.json", r)
        copy = seeded("spqr", 1, {"wikitext2": 90.0})  # one machine's job, present in both trees
        copy["environment"] = {"cpu": "Intel Xeon", "cpu_capability": "AVX2", "threads": 1}
        copy["config_hash"] = "copied"
        write_json_atomic(root / "1" / "result.json", copy)
    per_job, _ = compare(a, b)
    assert set(per_job["config_hash"]) == {"moved"}
