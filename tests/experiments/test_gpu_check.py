"""`make gpu-check` dry-runs on CPU: every method through the job runner and every solver through the timer."""

from experiments import gpu_check


def test_gpu_check_dry_run(tmp_path, shared_dir, monkeypatch):
    monkeypatch.setenv("OAC_SHARED", str(shared_dir))
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")])
    md = (tmp_path / "results" / "gpu_check_dry.md").read_text()
    assert rc == 0, md
    assert md.count("| complete |") == len(gpu_check.DRY_JOBS)
    assert all(name in md for name in ("gptq_w3_g128_act", "spqr_w2", "billm")) and "64×128" in md
