"""No silent wrong numbers: corrupt checkpoints, NaN results, one-line errors, failing sweeps, clashing jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from oac.errors import ConfigError
from oac.job import ResultError, run_job
from oac.jobdir import JobLocked, job_state
from oac.jobdir.lock import LOCK_FILE, JobLock
from tests.helpers import ROOT

TINY = ["model=stories260k", "calib.nsamples=4", "calib.seqlen=32", "eval.ppl.datasets=[wikitext2]",
        "eval.ppl.seqlen=128", "eval.ppl.max_windows=2"]


def strict_json(path):
    def no_constants(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def cli(*args, timeout=120, env=None):
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})})
    return out, time.perf_counter() - t


def test_garbage_checkpoint_is_moved_aside_and_the_job_completes(compose, tmp_path, single_thread, caplog):
    job = tmp_path / "job"
    job.mkdir()
    (job / "checkpoint.pt").write_bytes(b"not a torch file" * 10)
    with caplog.at_level("WARNING"):
        r = run_job(compose(*TINY, "method=gptq"), job)
    assert r["status"] == "complete" and r["resumed_from_block"] is None
    moved = list(job.glob("checkpoint.pt.corrupt-*"))
    assert len(moved) == 1 and not (job / "checkpoint.pt").exists()
    assert sum("moved aside" in m for m in caplog.messages) == 1


@pytest.fixture
def nan_model(tmp_path, shared_dir):
    """A copy of stories260K with one NaN in a quantizable weight."""
    from safetensors.torch import load_file, save_file

    src = shared_dir / "models" / "stories260K"
    dst = tmp_path / "nan260K"
    shutil.copytree(src, dst)
    (dst / "SHA256SUMS").unlink(missing_ok=True)
    w = load_file(str(dst / "model.safetensors"))
    key = next(k for k in w if k.endswith("mlp.down_proj.weight"))
    w[key][0, 0] = float("nan")
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_fp16_job_on_a_nan_weight_fails_with_strict_json(tmp_path, nan_model):
    out, _ = cli(*TINY, "method=fp16", f"model.path={nan_model}", f"hydra.run.dir={tmp_path / 'job'}")
    assert out.returncode == 2, out.stdout[-800:] + out.stderr[-800:]
    r = strict_json(tmp_path / "job" / "result.json")
    assert r["status"] == "failed" and "NaN/Inf" in r["error"]


def test_a_nan_perplexity_is_a_failure_not_a_result(compose, tmp_path, monkeypatch):
    import oac.job

    monkeypatch.setattr(oac.job, "perplexity", lambda *a, **k: {"ppl": float("nan"), "n_windows": 1,
                                                                 "complete": True})
    with pytest.raises(ResultError, match=r"non-finite metric\(s\): ppl\[wikitext2\]"):
        run_job(compose(*TINY, "method=fp16"), tmp_path / "job")
    r = strict_json(tmp_path / "job" / "result.json")
    assert r["status"] == "failed" and r["ppl"]["wikitext2"] is None  # written as null, never a bare NaN


@pytest.mark.parametrize("override,match", [("calib.nsamples=0", "calib.nsamples must be an integer >= 1, got 0"),
                                            ("calib.seqlen=100000",
                                             "calib.seqlen=100000 exceeds the model's context (512 tokens)")])
def test_bad_calibration_sizes_are_one_line_errors(tmp_path, override, match):
    out, dt = cli(*TINY, "method=gptq", override, f"hydra.run.dir={tmp_path / 'job'}")
    text = out.stdout + out.stderr
    assert out.returncode == 2 and match in text and "Traceback" not in text and dt < 20, text[-800:]


@pytest.fixture
def data_copy(tmp_path, data_dir):
    dst = tmp_path / "data"
    for sub in ("wikitext2", "c4"):
        shutil.copytree(data_dir / sub, dst / sub)
    shutil.copy(data_dir / "SHA256SUMS", dst / "SHA256SUMS")
    return dst


@pytest.mark.parametrize("verify,match", [("true", "does not match its checksum"),
                                          ("false", "is not valid JSON lines")])
def test_a_truncated_data_file_is_one_line_naming_it(tmp_path, data_copy, verify, match):
    f = data_copy / "wikitext2" / "wikitext-2-raw-v1.test.jsonl"
    f.write_bytes(f.read_bytes()[:5000])
    out, dt = cli(*TINY, "method=fp16", f"paths.data_dir={data_copy}", f"paths.verify_data={verify}",
                  f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'job'}")
    text = out.stdout + out.stderr
    assert out.returncode == 2 and match in text and str(f) in text and "Traceback" not in text and dt < 20, \
        text[-800:]


def test_a_sweep_with_failing_jobs_exits_nonzero_with_a_summary(tmp_path):
    out, _ = cli("-m", *TINY, "method=rtn,gptq", "method.wbits=2,9", f"paths.output_dir={tmp_path}", timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-1500:]
    assert "sweep: 4 jobs: 2 complete, 2 failed, 0 skipped" in text
    assert text.count("FAILED ") == 2 and "method=rtn method.wbits=9" in text and "method=gptq method.wbits=9" in text
    assert "method.wbits must be an integer 1..8, got 9" in text


def test_a_second_job_refuses_a_directory_a_live_job_holds(compose, tmp_path):
    job = tmp_path / "job"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        job.mkdir()
        (job / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "start": "then"}))
        with pytest.raises(JobLocked, match=rf"is locked by .* pid {holder.pid} since then, running"):
            run_job(compose(*TINY, "method=fp16"), job)
        out, _ = cli(*TINY, "method=fp16", f"hydra.run.dir={job}")
        assert out.returncode == 3 and f"pid {holder.pid}" in out.stdout + out.stderr
        assert not (job / "result.json").exists()  # the holder's directory is untouched
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is taken over with a warning and the job runs
    r = run_job(compose(*TINY, "method=fp16"), job)
    assert r["status"] == "complete" and not (job / LOCK_FILE).exists()


def test_two_identical_jobs_started_at_once_run_exactly_once(tmp_path):
    args = [sys.executable, "-m", "experiments.run", *TINY, "method=gptq", "calib.nsamples=16",
            f"hydra.run.dir={tmp_path / 'job'}"]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    codes = sorted(c for c, _ in outs)
    # one ran; the other was refused by the lock (3) or, if it started after the first finished, skipped (0)
    assert codes in ([0, 3], [0, 0]), outs
    texts = "".join(t for _, t in outs)
    assert "is locked by" in texts if codes == [0, 3] else "skipped: complete" in texts
    assert texts.count("checkpoint: 1 of 5 blocks done") == 1  # the quantization ran once
    assert strict_json(tmp_path / "job" / "result.json")["status"] == "complete"


def test_a_running_record_whose_holder_died_reports_interrupted(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    lock = JobLock(job)
    lock.acquire()
    assert job_state({"status": "running"}, job) == "running"
    (job / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 12345, "start": "x"}))
    assert job_state({"status": "running"}, job) == "interrupted"
    assert job_state({"status": "complete"}, job) == "complete"


def test_result_json_is_written_running_at_start(compose, tmp_path, monkeypatch):
    import oac.job

    seen = {}

    def fake_eval(cfg, model, tok, device, result, refs=None):
        seen.update(strict_json(tmp_path / "job" / "result.json"))
        raise ConfigError("stop here")

    monkeypatch.setattr(oac.job, "_evaluate", fake_eval)
    with pytest.raises(ConfigError):
        run_job(compose(*TINY, "method=fp16"), tmp_path / "job")
    assert seen["status"] == "running" and seen["run"]["pid"] == os.getpid()
    assert strict_json(tmp_path / "job" / "result.json")["status"] == "failed"
    assert not (tmp_path / "job" / LOCK_FILE).exists()
