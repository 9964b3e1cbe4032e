"""logger=wandb: config, per-block stats, metrics and the result row go to an offline W&B run."""

import time

from omegaconf import OmegaConf

from oac.logger import block_stats, log_job


def test_block_stats_means_per_block():
    layers = [{"block": 0, "name": "a", "shape": [2, 2], "time_s": 1.0, "damp_retries": 0},
              {"block": 0, "name": "b", "shape": [2, 2], "time_s": 3.0, "damp_retries": 2},
              {"block": 1, "name": "a", "shape": [2, 2], "time_s": 5.0}]
    assert block_stats(layers) == [{"block": 0, "time_s": 2.0, "damp_retries": 1.0}, {"block": 1, "time_s": 5.0}]


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create({"logger": OmegaConf.load("configs/logger/wandb.yaml"),
                            "model": {"name": "stories260k"}, "method": {"name": "gptq", "wbits": 2},
                            "calib": {"seed": 0}})
    result = {"status": "complete", "model": "stories260k", "method": "gptq", "wbits": 2, "tag": "smoke",
              "config": OmegaConf.to_container(cfg), "ppl": {"wikitext2": 12.5}, "bits_full": 2.5,
              "time_s": {"total": 3.0},
              "layers": [{"block": k, "name": "q", "shape": [4, 4], "time_s": 0.1 * k} for k in range(3)]}
    t = time.perf_counter()
    log_job(cfg, result, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "no offline run written"
    assert time.perf_counter() - t < 15
