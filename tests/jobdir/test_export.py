"""save_format=compressed-tensors (oac/jobdir/export.py, experiments/export.py) on stories260K: the export loads with
plain transformers ``from_pretrained`` and gives back the in-memory quantized model bit for bit."""

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import oac.job
from oac.errors import ConfigError
from oac.job import run_job, validate
from oac.jobdir import config_hash

JOB = ["model=stories260k", "method=gptq", "method.wbits=4", "method.groupsize=32", "calib.nsamples=8",
       "calib.seqlen=64", "eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=256", "eval.ppl.max_windows=2",
       "threads=1", "save=true"]
CT = "save_format=compressed-tensors"


def _compose_cfg(shared_dir, *overrides):
    from hydra import compose, initialize_config_dir

    from tests.helpers import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"paths.shared_dir={shared_dir}",
                                                        f"paths.cache_dir={ROOT / '.cache'}", *overrides])


def _run_capturing(cfg, out):
    """run_job, keeping a copy of the model it evaluated (the in-memory quantized model)."""
    seen = {}
    evaluate = oac.job._evaluate

    def capture(cfg, model, tok, device, result, refs=None):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return evaluate(cfg, model, tok, device, result, refs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oac.job, "_evaluate", capture)
        result = run_job(cfg, out)
    return result, seen


@pytest.fixture(scope="module", params=[False, True], ids=["natural", "act_order"])
def exported(request, tmp_path_factory, shared_dir):
    out = tmp_path_factory.mktemp(f"ct_{request.param}")
    cfg = _compose_cfg(shared_dir, *JOB, CT, f"method.act_order={str(request.param).lower()}")
    result, state = _run_capturing(cfg, out)
    return out, result, state, request.param


def _reload(path):
    """Plain transformers; compressed-tensors unpacks the weights on the first forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    return model


def test_reloaded_export_equals_in_memory_model(exported, shared_dir):
    from oac.data.tokens import eval_stream
    from oac.eval.perplexity import perplexity
    from tests.helpers import ROOT

    out, result, state, _ = exported
    assert result["status"] == "complete" and result["saved"]["format"] == "compressed-tensors"
    model = _reload(out / "compressed")
    got = model.state_dict()
    assert state.keys() <= got.keys()
    for k, v in state.items():  # every tensor, the 35 quantized linears included, bit for bit
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    tok = __import__("transformers").AutoTokenizer.from_pretrained(out / "compressed")
    ids = eval_stream(tok, "wikitext2", 256, data_dir=shared_dir / "data", cache_dir=str(ROOT / ".cache"))
    assert perplexity(model, ids, 256, max_windows=2)["ppl"] == result["ppl"]["wikitext2"]


def test_export_layout_and_size(exported):
    out, result, _, act_order = exported
    ct = out / "compressed"
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    weights = [g["weights"] for g in qc["config_groups"].values()]
    # d_in 64 (q,k,v,o,gate,up): groups of 32; d_in 172 = 5·32 + 12 (down_proj): stored groups of gcd(32, 172) = 4
    assert sorted(w["group_size"] for w in weights) == [4, 32]
    assert all(w["num_bits"] == 4 and not w["symmetric"] and w["scale_dtype"] == "torch.float32" for w in weights)
    assert all(w.get("actorder") == ("group" if act_order else None) for w in weights)
    tensors = load_file(str(ct / "model.safetensors"))
    down = "model.layers.0.mlp.down_proj"
    assert tensors[f"{down}.weight_scale"].shape == (64, 43) and tensors[f"{down}.weight_packed"].dtype == torch.int32
    assert (f"{down}.weight_g_idx" in tensors) == act_order and f"{down}.weight" not in tensors
    assert {"tokenizer.json", "recipe.yaml", "generation_config.json"} <= {p.name for p in ct.iterdir()}
    assert "config_hash: " + result["config_hash"] in (ct / "recipe.yaml").read_text()
    saved = result["saved"]
    assert saved["bytes"] == sum(p.stat().st_size for p in ct.iterdir()) and saved["bytes"] < saved["dense_bytes"]
    manifest = json.loads((out / "quantized" / "manifest.json").read_text())  # native blocks dropped
    assert manifest["saved_format"] == "compressed-tensors" and manifest["files"] == []
    assert not list((out / "quantized").glob("block_*"))


def test_eval_only_job_reads_the_export(exported, compose, tmp_path):
    out, result, _, _ = exported
    res = run_job(compose("eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=256", "eval.ppl.max_windows=2",
                          f"quantized_from={out}"), tmp_path)
    assert res["method"] == "gptq" and res["ppl"] == result["ppl"]


def test_cli_converts_a_native_save(exported, compose, tmp_path):
    """experiments.export on a native save of the same job writes the same tensors as the in-job export."""
    from experiments.export import main

    out, _, _, act_order = exported
    native = tmp_path / "native"
    res = run_job(compose(*JOB, f"method.act_order={str(act_order).lower()}"), native)
    assert res["saved"]["format"] == "native" and res["saved"]["bytes"] > res["saved"]["dense_bytes"] / 2
    cache = compose().paths.cache_dir
    assert main([str(native), "--format", "compressed-tensors", "--verify", "--cache-dir", cache]) == 0
    got, want = load_file(str(native / "compressed" / "model.safetensors")), load_file(str(out / "compressed" /
                                                                                            "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert len(list((native / "quantized").glob("block_*.safetensors"))) == 5  # kept without --drop-native


def test_cli_refuses_bad_input_in_one_line(tmp_path, caplog):
    from experiments.export import main

    q = tmp_path / "quantized"
    q.mkdir()
    (q / "manifest.json").write_text(json.dumps({"format": "oac-quantized/1", "method": {
        "name": "spqr", "solver": "spqr", "hessian": "layerwise", "wbits": 2, "groupsize": 16}}))
    assert main([str(tmp_path)]) == 2
    assert "method spqr has no compressed-tensors format; it supports save_format=native" in caplog.text
    assert main([str(tmp_path / "nothing")]) == 2 and "no saved quantized model" in caplog.text
    assert main([str(tmp_path), "--format", "gguf"]) == 2


@pytest.mark.parametrize("overrides,message", [
    (["method=spqr"], "method spqr has no compressed-tensors format; it supports save_format=native"),
    (["method=billm"], "method billm has no compressed-tensors format; it supports save_format=native"),
    (["method=oac_spqr"], "method oac_spqr has no compressed-tensors format"),
    (["method=fp16"], "method fp16 does not quantize"),
    (["method=rtn", "save=false"], "save_format=compressed-tensors needs save=true"),
])
def test_unsupported_save_format_is_one_line(compose, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate(compose("save=true", CT, *overrides))
    assert "\n" not in str(e.value)


def test_uniform_grid_methods_accept_the_export(compose):
    for method in ("rtn", "gptq", "oac_gptq"):
        validate(compose(f"method={method}", "save=true", CT))
    with pytest.raises(ConfigError, match="save_format must be one of native, compressed-tensors"):
        validate(compose("method=rtn", "save=true", "save_format=gguf"))


def test_save_format_keeps_config_hash(compose):
    """save_format never changes numbers: it is volatile, so jobs hashed before it existed keep their hash."""
    from omegaconf import OmegaConf, open_dict

    cfg = compose(*JOB)
    legacy = cfg.copy()
    with open_dict(legacy):
        del legacy["save_format"]
    assert "save_format" in OmegaConf.to_container(cfg) and "save_format" not in OmegaConf.to_container(legacy)
    assert config_hash(cfg) == config_hash(legacy) == config_hash(compose(*JOB, CT))


def test_spqr_export_fails_fast_from_the_command_line(shared_dir, tmp_path):
    from tests.helpers import ROOT

    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "experiments.run", "model=stories260k", "method=spqr", "save=true", CT,
                        f"paths.shared_dir={shared_dir}", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 2 and wall < 10, (p.returncode, wall)
    assert len(lines) == 1 and "method spqr has no compressed-tensors format" in lines[0], lines


def test_job_failing_after_the_export_resumes_and_exports_again(compose, tmp_path):
    """The native blocks are the crash checkpoint's until the job completes: they go only then."""
    cfg = compose(*JOB, CT)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during evaluation")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oac.job, "_evaluate", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_job(cfg, tmp_path)
    assert (tmp_path / "compressed" / "model.safetensors").exists()
    assert len(list((tmp_path / "quantized").glob("block_*.safetensors"))) == 5  # kept for the resume
    res = run_job(cfg, tmp_path)
    assert res["status"] == "complete" and res["resumed_from_block"] == 5
    assert not list((tmp_path / "quantized").glob("block_*.safetensors"))
    assert res["saved"]["format"] == "compressed-tensors"


@pytest.mark.parametrize("overrides", [
    ["method=rtn", "method.wbits=2", "method.groupsize=32"],
    ["method=rtn", "method.wbits=8", "method.groupsize=-1", "method.sym=true"],
    ["method=rtn", "method.wbits=3", "method.groupsize=48"],  # short last groups on 64 and 172 columns
    ["method=oac_gptq", "method.wbits=3", "method.groupsize=-1", "method.sym=true", "method.act_order=true"],
], ids=["rtn-w2-g32", "rtn-w8-pc-sym", "rtn-w3-g48", "oac_gptq-w3-pc-sym-act"])
def test_other_grids_reload_exactly(shared_dir, tmp_path, overrides):
    from oac.data.tokens import eval_stream
    from oac.eval.perplexity import perplexity
    from tests.helpers import ROOT

    cfg = _compose_cfg(shared_dir, *JOB, CT, *overrides)
    result, state = _run_capturing(cfg, tmp_path)
    model = _reload(tmp_path / "compressed")
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tmp_path / "compressed")
    ids = eval_stream(tok, "wikitext2", 256, data_dir=shared_dir / "data", cache_dir=str(ROOT / ".cache"))
    assert perplexity(model, ids, 256, max_windows=2)["ppl"] == result["ppl"]["wikitext2"]


def test_committed_config_hashes_unchanged():
    """The config now has save_format; the committed table1_cpu jobs still hash as they did when they ran."""
    import pandas as pd
    from hydra import compose, initialize_config_dir

    from tests.helpers import ROOT

    runs = pd.read_csv(ROOT / "results" / "table1_cpu_runs.csv")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for _, row in runs.iterrows():  # paths as they resolved then (output and cache dirs are volatile)
            cfg = compose(config_name="config", overrides=[*row["overrides"].split(), "paths.shared_dir=../shared"])
            assert cfg.save_format == "native" and config_hash(cfg) == row["config_hash"], row["overrides"]


def test_guided_row_groups_are_refused_for_compressed_tensors(compose):
    from oac.errors import ConfigError
    from oac.job import validate

    with pytest.raises(ConfigError, match="row groups"):
        validate(compose("model=stories260k", "method=guided_gptq", "method.guided.groups=2", "save=true",
                         "save_format=compressed-tensors"))
    validate(compose("model=stories260k", "method=guided_gptq", "save=true", "save_format=compressed-tensors"))
