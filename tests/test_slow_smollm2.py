"""Slow checks on the real embedded SmolLM2-135M (`make test-slow`; about 20-60 min on 2 CPU cores)."""

import pytest


@pytest.mark.slow
def test_smollm2_fp32_wikitext2_full(compose, tmp_path):
    """GPTQ-protocol WikiText2 at 2048 over the whole test set: 304,986 tokens, 148 windows, ppl 21.61."""
    from oac.job import run_job

    cfg = compose("model=smollm2-135m", "method=fp16", "eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=2048")
    r = run_job(cfg, tmp_path / "job")
    d = r["ppl_details"]["wikitext2"]
    assert d["n_windows"] == 148 and d["complete"]
    assert 21.4 < r["ppl"]["wikitext2"] < 21.8


@pytest.mark.slow
def test_smollm2_gptq_beats_rtn_3bit(compose, tmp_path):
    from oac.job import run_job

    common = ["model=smollm2-135m", "calib.nsamples=16", "calib.seqlen=256", "eval.ppl.datasets=[wikitext2]",
              "eval.ppl.seqlen=512", "eval.ppl.max_windows=8", "method.wbits=3"]
    rtn = run_job(compose("method=rtn", *common), tmp_path / "rtn")["ppl"]["wikitext2"]
    gptq = run_job(compose("method=gptq", *common), tmp_path / "gptq")["ppl"]["wikitext2"]
    assert gptq < rtn
