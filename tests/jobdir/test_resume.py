"""Resumable jobs (skip complete, per-block checkpoint + resume) and saved quantized models (stories260K)."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from oac.job import run_job
from oac.jobdir import config_hash
from oac.jobdir.resume import CHECKPOINT_FILE, BlockCheckpoint

JOB = ["model=stories260k", "method=gptq", "method.wbits=3", "calib.nsamples=8", "calib.seqlen=64",
       "eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=256", "eval.ppl.max_windows=2", "threads=1", "save=true"]


class Interrupted(RuntimeError):
    pass


def _blocks(job_dir):
    return {p.name: load_file(str(p)) for p in sorted((job_dir / "quantized").glob("block_*.safetensors"))}


def test_config_hash_ignores_volatile_keys(compose):
    a = compose(*JOB)
    b = compose(*JOB, "paths.output_dir=/elsewhere", "checkpoint=false", "threads=2")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(compose(*JOB, "calib.seed=1"))


@pytest.mark.parametrize("method,option", [("oac_gptq", "oac"), ("guided_gptq", "guided")])
def test_a_hessian_sources_cache_dir_is_not_part_of_the_identity(compose, method, option):
    """Where a source keeps its cached Hessians never changes a number: the same job with another cache path
    must be skipped, resumed and reused as the same job (the guided source once lacked this)."""
    base = compose("model=stories260k", f"method={method}")
    moved = compose("model=stories260k", f"method={method}", f"method.{option}.cache_dir=/elsewhere/cache")
    assert moved.method[option].cache_dir == "/elsewhere/cache"
    assert config_hash(base) == config_hash(moved)
    assert config_hash(base) != config_hash(compose("model=stories260k", f"method={method}",
                                                    f"method.{option}.seed=1"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_dir):
    """An uninterrupted job with save=true."""
    from tests.helpers import ROOT
    from hydra import compose, initialize_config_dir

    out = tmp_path_factory.mktemp("ref")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.shared_dir={shared_dir}",
                                                       f"paths.cache_dir={ROOT / '.cache'}", *JOB])
    return out, run_job(cfg, out)


def test_interrupted_job_resumes_exactly(compose, reference, tmp_path, monkeypatch, caplog):
    ref_dir, ref = reference
    assert not (ref_dir / CHECKPOINT_FILE).exists()  # removed on completion
    cfg = compose(*JOB)
    job = tmp_path / "job"
    orig = BlockCheckpoint.on_block_done

    def crash_after_block_2(self, k, state, inps):
        orig(self, k, state, inps)
        if k == 2:
            raise Interrupted("simulated kill after block 2")

    monkeypatch.setattr(BlockCheckpoint, "on_block_done", crash_after_block_2)
    with pytest.raises(Interrupted):
        run_job(cfg, job)
    assert (job / CHECKPOINT_FILE).exists()
    assert torch.load(job / CHECKPOINT_FILE, weights_only=True)["block"] == 2
    monkeypatch.setattr(BlockCheckpoint, "on_block_done", orig)

    res = run_job(cfg, job)  # rerun: resumes at block 3
    assert res["status"] == "complete" and res["resumed_from_block"] == 3
    assert res["ppl"] == ref["ppl"]
    assert [r["name"] for r in res["layers"]] == [r["name"] for r in ref["layers"]]
    got, want = _blocks(job), _blocks(ref_dir)
    assert got.keys() == want.keys() and len(got) == 5
    for f in want:
        assert got[f].keys() == want[f].keys()
        for key in want[f]:
            assert torch.equal(got[f][key], want[f][key]), (f, key)
    assert not (job / CHECKPOINT_FILE).exists()

    caplog.set_level(logging.INFO, logger="oac.job")
    again = run_job(cfg, job)  # complete for the same config: skipped
    assert "skipped: complete" in caplog.text and again["time_s"] == res["time_s"]


def test_checkpoint_files_removed_without_save(compose, tmp_path):
    res = run_job(compose(*JOB[:-1], "save=false"), tmp_path)
    assert res["status"] == "complete"
    assert not (tmp_path / CHECKPOINT_FILE).exists() and not (tmp_path / "quantized").exists()


def test_saved_model_reloads_with_same_perplexity(compose, reference, shared_dir, tmp_path):
    from oac.jobdir.saved import load_masks, load_quantized
    from oac.data.tokens import eval_stream
    from oac.eval.perplexity import perplexity
    from tests.helpers import ROOT

    ref_dir, ref = reference
    model, tok, manifest = load_quantized(ref_dir, cache_dir=str(ROOT / ".cache"))
    assert manifest["method"]["name"] == "gptq" and manifest["bits"]["bits_full"] == ref["bits_full"]
    ids = eval_stream(tok, "wikitext2", 256, data_dir=shared_dir / "data", cache_dir=str(ROOT / ".cache"))
    assert perplexity(model, ids, 256, max_windows=2)["ppl"] == ref["ppl"]["wikitext2"]
    masks = load_masks(ref_dir)
    assert any(k.endswith(".scale") for k in masks)

    # eval-only job: model/method/calib come from the saved job, no calibration
    res = run_job(compose("eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=256", "eval.ppl.max_windows=2",
                          f"quantized_from={ref_dir}"), tmp_path)
    assert res["model"] == "stories260k" and res["method"] == "gptq"
    assert res["ppl"] == ref["ppl"] and res["bits_full"] == ref["bits_full"]
    assert "calib_hessian" not in res["time_s"]


def test_resume_restores_source_state_not_options():
    """A resumed OAC job keeps the options of its (possibly changed) config, e.g. a new cache_dir, and gets
    back only the run state (dynamic loss scale, Ĥ computed ahead, counters)."""
    from oac.hessian.output_adaptive import OutputAdaptiveHessian
    from oac.jobdir.resume import restore_source_state, source_state

    old = OutputAdaptiveHessian(cache_dir="/old/cache", loss_scale="dynamic")
    old._scale, old.stats["passes"] = 512.0, 7
    saved = source_state(old)
    assert "cache_dir" not in saved and saved["_scale"] == 512.0
    new = OutputAdaptiveHessian(cache_dir="/new/cache", loss_scale="dynamic")
    restore_source_state(new, {**saved, "cache_dir": "/old/cache"})  # a checkpoint that still holds the option
    assert new.cache_dir == "/new/cache" and new._scale == 512.0 and new.stats["passes"] == 7
