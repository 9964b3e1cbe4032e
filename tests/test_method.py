"""A method is a solver fed by a Hessian source: spellings, registries, validation before the model loads."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from oac import hessian, method, solvers
from oac.errors import ConfigError
from oac.jobdir import config_hash
from oac.job import run_job
from tests.helpers import ROOT

PRESETS = {"fp16": ("none", "none"), "rtn": ("rtn", "none"), "gptq": ("gptq", "layerwise"),
           "spqr": ("spqr", "layerwise"), "billm": ("billm", "layerwise"), "oac_gptq": ("gptq", "output_adaptive"),
           "oac_spqr": ("spqr", "output_adaptive"), "oac_billm": ("billm", "output_adaptive"),
           "guided_gptq": ("gptq", "guided"), "guided_spqr": ("spqr", "guided"), "guided_billm": ("billm", "guided")}
# stories260K: d_in 64/172, d_out 64/172 -> SpQR needs groups dividing both
TINY = ["model=stories260k", "calib.nsamples=4", "calib.seqlen=32", "eval.ppl.datasets=[wikitext2]",
        "eval.ppl.seqlen=128", "eval.ppl.max_windows=2", "checkpoint=false"]
SPQR_TINY = ["method.groupsize=4", "method.qq_groupsize=4"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_spelling_resolves_to_the_same_job(compose, preset):
    s, h = PRESETS[preset]
    cfgs = [compose(f"method={preset}"), compose(f"solver={s}", f"hessian={h}")]
    if h != "none":  # from the preset of the other source, switching the source on the command line
        cfgs.append(compose(f"method={s if h == 'output_adaptive' else 'oac_' + s}", f"hessian={h}"))
    hashes = {config_hash(c) for c in cfgs}
    assert len(hashes) == 1, [OmegaConf.to_container(c.method) for c in cfgs]
    assert cfgs[0].method.name == preset


@pytest.mark.parametrize("spelling", ["method=billm", "method=oac_billm", "setting=billm", "setting=oac_billm",
                                      "solver=billm hessian=layerwise", "experiment=smoke setting=billm",
                                      "experiment=table2_cpu setting=oac_billm", "experiment=main_cpu setting=billm"])
def test_billm_uses_its_own_calibration_rule_however_spelled(compose, spelling):
    assert compose(*spelling.split()).calib.accept == "gt"


@pytest.mark.parametrize("spelling", ["method=gptq", "method=oac_spqr", "experiment=smoke setting=gptq_w2",
                                      "experiment=main_cpu setting=spqr_w2_o1"])
def test_gptq_family_uses_the_gptq_rule(compose, spelling):
    assert compose(*spelling.split()).calib.accept == "ge"


@pytest.mark.parametrize("oac,layerwise", [("method=oac_gptq", "method=gptq hessian=output_adaptive"),
                                           ("method=oac_billm", "method=billm hessian=output_adaptive"),
                                           ("method=oac_spqr " + " ".join(SPQR_TINY),
                                            "method=spqr hessian=output_adaptive " + " ".join(SPQR_TINY)),
                                           ("method=gptq", "method=oac_gptq hessian=layerwise")])
def test_both_spellings_give_bit_identical_jobs(compose, tmp_path, single_thread, oac, layerwise):
    a = run_job(compose(*TINY, *oac.split()), tmp_path / "a")
    b = run_job(compose(*TINY, *layerwise.split()), tmp_path / "b")
    assert a["status"] == b["status"] == "complete"
    assert a["config_hash"] == b["config_hash"] and a["method"] == b["method"]
    assert a["ppl"] == b["ppl"]  # bit-identical floats


def test_rtn_runs_through_the_block_loop_with_a_quantize_time(compose, tmp_path, single_thread):
    r = run_job(compose(*TINY, "method=rtn", "method.wbits=3"), tmp_path / "rtn")
    assert r["status"] == "complete" and r["time_s"]["quantize"] > 0
    assert r["time_s"]["calib_catch"] == 0 and r["time_s"]["calib_propagate"] == 0  # no calibration forward
    assert "calibration" not in r and r["hessian"] == {"hessian": None}


# ------------------------------------------------------------------------------- validation before loading


@pytest.mark.parametrize("override,match", [
    ("method.percdamp=-1", r"method\.percdamp must be a number in \[0, inf\], got -1"),
    ("+method.target_outlier_fraction=2.0", r"method\.target_outlier_fraction must be a number in \[0, 1\), got 2\.0"),
    ("+method.foo=1", r"unknown option\(s\) \['foo'\]; valid: \["),
    ("method.oac.refresh=sometimes", r"method\.oac\.refresh must be one of \['per_block', 'every', 'once'\]"),
    ("+method.oac.bar=1", r"method\.oac: unknown option\(s\) \['bar'\]"),
    ("method.wbits=9", r"method\.wbits must be an integer 1\.\.8, got 9"),
])
def test_bad_options_fail_before_the_model_loads(compose, tmp_path, monkeypatch, override, match):
    import oac.job

    monkeypatch.setattr(oac.job, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    base = "method=oac_spqr" if "outlier" in override or "oac." in override else "method=oac_gptq"
    with pytest.raises(ConfigError, match=match):
        run_job(compose(base, override), tmp_path / "job")
    assert not (tmp_path / "job" / "result.json").exists()


@pytest.mark.parametrize("cfg,match", [({"name": "x", "solver": "rtn", "hessian": "layerwise"}, "uses no Hessian"),
                                       ({"name": "x", "solver": "gptq", "hessian": None}, "needs a Hessian source"),
                                       ({"name": "x", "solver": "nope", "hessian": None}, "unknown solver 'nope'"),
                                       ({"name": "x", "solver": "gptq", "hessian": "nope"}, "unknown Hessian source"),
                                       ({"name": "x", "solver": "gptq", "hessian": "output_adaptive",
                                         "true_sequential": True}, "true_sequential=true does not apply")])
def test_impossible_combinations_are_one_line_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        method.resolve(cfg)


def test_bad_option_on_smollm2_fails_in_seconds_from_the_command_line():
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "experiments.run", "model=smollm2-135m", "method=spqr",
                          "method.percdamp=-1", "hydra.run.dir=/tmp/oac-test-never-written"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    dt = time.perf_counter() - t
    assert out.returncode == 2 and dt < 10, (dt, out.stdout[-500:], out.stderr[-500:])
    text = out.stdout + out.stderr
    assert "method.percdamp must be a number in [0, inf], got -1" in text and "Traceback" not in text


# ------------------------------------------------------------------- a new source from a test file only


@dataclass
class ToyOptions:
    scale: float = 1.0

    def __post_init__(self):
        if not self.scale > 0:
            raise ConfigError(f"method.toy.scale must be > 0, got {self.scale}")


class ToyIdentityHessian:
    """H = scale·I for every linear: a solver fed by it rounds like RTN with error feedback of a diagonal H."""

    name = "toy_identity"
    calibrated = True
    supports_groups = True
    RESUME_STATE = ()

    def __init__(self, options: ToyOptions):
        self.options = options

    def hessians(self, ctx, group):
        return {n: self.options.scale * torch.eye(m.in_features) for n, m in group.items()}

    def record(self):
        return {"hessian": self.name, "scale": self.options.scale}


@pytest.fixture
def toy_source():
    spec = hessian.HESSIANS.register(hessian.HessianSpec("toy_identity", ToyIdentityHessian, ToyOptions,
                                                         options_key="toy"))
    yield spec
    hessian.HESSIANS.unregister("toy_identity")


def test_a_source_registered_from_a_test_runs_a_job_and_pairs_in_the_report(compose, tmp_path, toy_source,
                                                                          single_thread):
    from experiments.report import report

    assert "toy" in method.source_keys() and hessian.is_variant("toy_identity")
    out = tmp_path / "outputs"
    common = [*TINY, "tag=toy_table", "method=gptq", "method.wbits=3"]
    jobs = {"gptq": [], "toy": ["method.hessian=toy_identity", "method.name=toy_gptq", "+method.toy.scale=2.0"]}
    for seed in (0, 1):
        for name, extra in jobs.items():
            ov = [*common, *extra, f"calib.seed={seed}"]
            r = run_job(compose(*ov), out / f"{name}-s{seed}", overrides=ov)
            assert r["status"] == "complete", r.get("error")
            if name == "toy":
                assert r["hessian"] == {"hessian": "toy_identity", "scale": 2.0}
    report(out, tmp_path / "results")
    pairs = pd.read_csv(tmp_path / "results" / "toy_table_paired.csv")
    row = pairs[pairs["metric"] == "ppl:wikitext2"].iloc[0]
    assert row["method"] == "toy_gptq" and row["backbone"] == "gptq" and row["n"] == 2


def test_registries_find_their_modules():
    assert {"rtn", "gptq", "spqr", "billm", "identity"} <= set(solvers.SOLVERS.names())
    assert {"none", "layerwise", "output_adaptive", "guided"} <= set(hessian.HESSIANS.names())
    assert hessian.get(None).name == "none" and not hessian.get(None).calibrated
    assert [s.name for s in sorted(hessian.HESSIANS.specs(), key=lambda s: s.order)][:2] == ["none", "layerwise"]
