"""Every config composes; every experiment sweep expands to its job list with stable, distinct job dirs."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
LLAMA = ["llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama2-7b", "llama2-13b", "llama2-70b"]
OPT = ["opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b"]
T1 = ["fp16", "rtn_w2", "gptq_w2", "spqr_w2", "oac_spqr_w2"]
T2 = ["fp16", "billm", "oac_billm"]
# experiment -> (settings, models, extra swept values per job)
EXPECTED = {
    "table1": (T1, LLAMA + OPT, 1), "table2": (T2, LLAMA, 1), "table3": (T1 + T2[1:], LLAMA, 1),
    "ablation": (None, ["llama-7b", "llama2-7b"], 12),
    "table1_cpu": (T1, ["smollm2-135m"], 1), "table2_cpu": (T2, ["smollm2-135m"], 1),
    "table3_cpu": (T1 + T2[1:], ["smollm2-135m"], 1), "ablation_cpu": (None, ["smollm2-135m"], 12),
    "smoke": (["fp16", "rtn_w2", "gptq_w2", "billm", "oac_billm"], ["stories260k"], 1),
}
SETTING_METHOD = {"fp16": "fp16", "rtn_w2": "rtn", "gptq_w2": "gptq", "spqr_w2": "spqr", "oac_spqr_w2": "oac_spqr",
                  "billm": "billm", "oac_billm": "oac_billm"}


@pytest.fixture(scope="module")
def hydra_compose():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda overrides, hydra=False: compose("config", overrides=list(overrides), return_hydra_config=hydra)


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_config_composes(hydra_compose):
    for group in ("model", "method", "calib", "eval", "logger", "paths"):
        for name in _names(group):
            cfg = hydra_compose([f"{group}={name}"])
            assert cfg[group] is not None, (group, name)
    for name in _names("setting"):
        assert hydra_compose([f"+setting={name}"]).method.name == SETTING_METHOD[name]
    assert set(_names("experiment")) == set(EXPECTED)
    for name in _names("experiment"):
        assert hydra_compose([f"+experiment={name}"]).tag == name
    cfg = hydra_compose(["hydra/launcher=slurm", "+experiment=table1"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1
    assert launcher.submitit_folder.startswith(str(cfg.hydra.sweep.dir))
    assert any("HF_HUB_OFFLINE" in line for line in launcher.setup)


def expand(hydra_compose, experiment: str):
    """The job override lists Hydra's BasicSweeper would launch, and the hydra config of the sweep."""
    hcfg = hydra_compose([f"+experiment={experiment}"], hydra=True).hydra
    params = [f"{k}={v}" for k, v in hcfg.sweeper.params.items()]
    parser = OverridesParser.create()
    [jobs] = BasicSweeper.split_arguments(parser.parse_overrides([f"+experiment={experiment}", *params]), None)
    return jobs, hcfg


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_sweep_expands_to_expected_jobs(hydra_compose, experiment):
    settings, models, extra = EXPECTED[experiment]
    jobs, hcfg = expand(hydra_compose, experiment)
    assert len(jobs) == (len(settings) if settings else 1) * len(models) * extra
    parser = OverridesParser.create()
    dconf = hcfg.job.config.override_dirname
    dirs = {get_overrides_dirname(parser.parse_overrides(j), list(dconf.exclude_keys), dconf.item_sep, dconf.kv_sep)
            for j in jobs}
    assert len(dirs) == len(jobs) and all("experiment" not in d and d for d in dirs)
    assert hcfg.sweep.dir.endswith(f"/{experiment}")
    # compose every job of small sweeps; for paper-scale ones every setting once and every model once
    first = {o.split("=", 1)[0]: o for o in jobs[0]}
    sample = jobs if len(jobs) <= 8 else [j for j in jobs if len(set(j) - set(first.values())) <= 1]
    for job in sample:
        cfg = hydra_compose(job)
        kv = dict(o.split("=", 1) for o in job)
        assert cfg.tag == experiment and cfg.model.name == kv["model"]
        if settings:
            assert cfg.method.name == SETTING_METHOD[kv["+setting"]]
            if kv["+setting"].endswith("_w2"):
                assert cfg.method.wbits == 2
        else:
            assert cfg.method.name == "oac_spqr" and cfg.method.oac.refresh == kv["method.oac.refresh"]
        assert cfg.device == ("cuda" if experiment in ("table1", "table2", "table3", "ablation") else "cpu")


def test_slurm_launcher_resolves_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "experiments.run", "+experiment=table2", "hydra/launcher=slurm",
                          "--cfg", "all", "--resolve"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SlurmLauncher" in out.stdout and "partition:" in out.stdout and "export HF_HUB_OFFLINE=" in out.stdout
