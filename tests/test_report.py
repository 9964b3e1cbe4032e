"""Report: aggregation over seeds, joins with the reference CSVs, paper-style Markdown; reference CSVs."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from experiments import paper_refs
from experiments.report import report, result_row
from oac.results import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def fake_result(model, method, seed, ppl, *, wbits=2, status="complete", tag="table1", bits=2.0, zs=None):
    cfg = {"model": {"name": model}, "method": {"name": method, "wbits": wbits},
           "calib": {"dataset": "c4", "nsamples": 128, "seqlen": 2048, "seed": seed},
           "eval": {"ppl": {"datasets": list(ppl), "seqlen": 2048, "max_windows": None}},
           "paths": {"output_dir": "x"}, "tag": tag}
    return {"status": status, "model": model, "method": method, "wbits": wbits, "tag": tag, "config": cfg,
            "ppl": ppl if status == "complete" else {}, "bits_nominal": bits, "bits_reported": bits,
            "bits_full": bits + 0.5, "avg_bits": bits + 0.5, "device": "cuda:H100", "time_s": {"total": 1.0},
            "zeroshot": zs or {}}


@pytest.fixture
def tree(tmp_path):
    out = tmp_path / "outputs"
    jobs = {
        "a/s0": fake_result("llama2-13b", "oac_spqr", 0, {"wikitext2": 7.0, "c4-new": 9.0}),
        "a/s1": fake_result("llama2-13b", "oac_spqr", 1, {"wikitext2": 8.0, "c4-new": 10.0}),
        "b": fake_result("llama-7b", "fp16", 0, {"wikitext2": 5.68}, wbits=None, bits=16.0),
        "c": fake_result("llama-7b", "gptq", 0, {}, status="failed"),
        "d": fake_result("llama-7b", "gptq", 0, {"wikitext2": 150.0}),
    }
    for d, r in jobs.items():
        write_json_atomic(out / d / "result.json", r)
    results = tmp_path / "results"
    paper_refs.write(results / "paper")
    return out, results


def test_report_groups_seeds_and_joins_references(tree):
    out, results = tree
    written = report(out, results)
    assert set(written) == {"table1"}
    runs = pd.read_csv(results / "table1_runs.csv")
    assert len(runs) == 5 and (runs["status"] == "failed").sum() == 1
    long = pd.read_csv(results / "table1.csv")
    oac = long[(long["method"] == "oac_spqr") & (long["dataset"] == "c4-new")].iloc[0]
    assert oac["n"] == 2 and oac["value"] == pytest.approx(9.5) and oac["std"] == pytest.approx(0.7071, abs=1e-4)
    assert oac["paper_value"] == 9.49 and oac["paper_status"] == "unverified"
    fp = long[(long["method"] == "fp16")].iloc[0]
    assert fp["lit_value"] == 5.68 and fp["lit_status"] == "verified" and bool(fp["comparable"])
    gptq = long[long["method"] == "gptq"].iloc[0]
    assert gptq["lit_value"] == 152.31 and gptq["paper_status"] == "missing"
    md = (results / "table1.md").read_text()
    assert "9.50 ± 0.71 (n=2)" in md and "oac_spqr w2 · c4-new" in md and "1 job(s) not complete" in md
    assert "paper 9.49 (unverified)" in md


def test_result_row_zeroshot_in_percent():
    zs = {"tasks": {"piqa": {"acc": 0.5, "acc_norm": 0.6, "metric_for_avg": "acc_norm"}},
          "average": {"value": 0.6}}
    row = result_row(fake_result("llama-7b", "billm", 0, {}, wbits=None, zs=zs))
    assert row["zs:piqa"] == pytest.approx(60.0) and row["zs:average"] == pytest.approx(60.0)


def test_reference_csvs_never_invent_numbers(tmp_path):
    paths = paper_refs.write(tmp_path)
    text = (ROOT.parent / "shared" / "docs" / "PAPER.md")
    if not text.exists():
        pytest.skip("PAPER.md not found")
    numbers = {float(x) for x in re.findall(r"\d+(?:\.\d+)?", text.read_text())}
    oac = pd.read_csv(paths["oac_paper"])
    assert list(oac.columns) == paper_refs.COLUMNS
    known = oac[oac["status"] != "missing"]
    assert len(known) == 1 and known.iloc[0]["value"] == 9.49 and known.iloc[0]["status"] == "unverified"
    assert oac[oac["status"] == "missing"]["value"].isna().all()
    lit = pd.read_csv(paths["literature"])
    assert set(lit["status"]) == {"verified", "unverified"} and lit["value"].notna().all()
    assert set(lit["value"]) <= numbers
    # the committed copies are what this script writes
    for name, p in paths.items():
        committed = ROOT / "results" / "paper" / f"{name}.csv"
        assert committed.read_text() == p.read_text(), f"regenerate {committed}: python -m experiments.paper_refs"
