"""Every config composes; every experiment sweep expands to its job list with stable, distinct job dirs."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.helpers import ROOT
CONFIGS = ROOT / "configs"
LLAMA = ["llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama2-7b", "llama2-13b", "llama2-70b"]
OPT = ["opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b"]
T1 = ["fp16", "rtn_w2", "gptq_w2", "spqr_w2", "oac_spqr_w2"]
T2 = ["fp16", "billm", "oac_billm"]
MAIN = ["spqr_w2_o1", "oac_spqr_w2_o1", "billm", "oac_billm"]
MAIN_CPU = MAIN + ["oac_spqr_w2_o1_once", "oac_billm_once"]
# issue #18: two backbones x six Hessian sources (layer-wise, OAC per_block, OAC once, guided G = 1, 2, 4)
HESS = [f"{p}{b}{s}" for b in ("spqr_w2_o1", "gptq_w3_g128")
        for p, s in [("", ""), ("oac_", ""), ("oac_", "_once"), ("guided_", "_g1"), ("guided_", "_g2"), ("guided_", "_g4")]]
FRONTIER = ["spqr_w2_o1", "oac_spqr_w2_o1", "oac_spqr_w2_o1_every2", "oac_spqr_w2_o1_every4", "oac_spqr_w2_o1_every8",
            "oac_spqr_w2_o1_once", "guided_spqr_w2_o1_g4_per_block", "guided_spqr_w2_o1_g4"]
# experiment -> (settings, models, extra swept values per job)
EXPECTED = {
    "table1": (T1, LLAMA + OPT, 1), "table2": (T2, LLAMA, 1), "table3": (T1 + T2[1:], LLAMA, 1),
    "ablation": (None, ["llama-7b", "llama2-7b"], 12),
    "table1_cpu": (T1[:3] + ["spqr_w2_o1", "oac_spqr_w2_o1"], ["smollm2-135m"], 1), "table2_cpu": (T2, ["smollm2-135m"], 1),
    "table3_cpu": (T1 + T2[1:], ["smollm2-135m"], 1), "ablation_cpu": (None, ["smollm2-135m"], 12),
    "smoke": (["fp16", "rtn_w2", "gptq_w2", "billm", "oac_billm"], ["stories260k"], 1),
    # seed-repeated main comparison: settings x 3 calibration seeds
    "main": (MAIN, ["llama2-7b"], 3),
    "main_cpu": (MAIN_CPU, ["smollm2-135m"], 3),
    # its numeric-noise replicates: the main pair at seed 0 x jitter_seed 1, 2 (pooled under the main_cpu tag)
    "main_cpu_jitter": (["spqr_w2_o1", "oac_spqr_w2_o1"], ["smollm2-135m"], 2),
    # Hessian sources x 3 calibration seeds, on CPU and its paper-scale twin; the refresh frontier x 3 seeds
    "hessians_cpu": (HESS, ["smollm2-135m"], 3), "hessians": (HESS, ["llama2-7b"], 3),
    "oac_frontier_cpu": (FRONTIER, ["smollm2-135m"], 3),
}
TAG = {"main_cpu_jitter": "main_cpu"}
SETTING_METHOD = {"fp16": "fp16", "rtn_w2": "rtn", "gptq_w2": "gptq", "spqr_w2": "spqr", "oac_spqr_w2": "oac_spqr",
                  "billm": "billm", "oac_billm": "oac_billm", "spqr_w2_o1": "spqr", "oac_spqr_w2_o1": "oac_spqr",
                  "oac_spqr_w2_o1_once": "oac_spqr", "oac_billm_once": "oac_billm",
                  **{h: h.split("_w")[0] for h in HESS + FRONTIER if "_w" in h}}
# settings whose Hessian source has options: (options key, {option: value})
SETTING_SOURCE = {**{f"guided_{b}_g{G}": ("guided", {"groups": G, "refresh": "once"})
                     for b in ("spqr_w2_o1", "gptq_w3_g128") for G in (1, 2, 4)},
                  **{f"oac_spqr_w2_o1_every{r}": ("oac", {"refresh": "every", "refresh_every": r}) for r in (2, 4, 8)},
                  "oac_spqr_w2_o1": ("oac", {"refresh": "per_block", "product": "sequence"}),
                  "oac_gptq_w3_g128": ("oac", {"refresh": "per_block", "product": "sequence"}),
                  "oac_spqr_w2_o1_once": ("oac", {"refresh": "once"}), "oac_gptq_w3_g128_once": ("oac", {"refresh": "once"}),
                  "guided_spqr_w2_o1_g4_per_block": ("guided", {"groups": 4, "refresh": "per_block"})}


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
        assert hydra_compose([f"setting={name}"]).method.name == SETTING_METHOD[name]
    assert set(_names("experiment")) == set(EXPECTED)
    for name in _names("experiment"):
        assert hydra_compose([f"experiment={name}"]).tag == TAG.get(name, name)
    cfg = hydra_compose(["hydra/launcher=slurm", "experiment=table1"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1
    assert launcher.submitit_folder.startswith(str(cfg.hydra.sweep.dir))
    assert any("HF_HUB_OFFLINE" in line for line in launcher.setup)


def expand(hydra_compose, experiment: str):
    """The job override lists Hydra's BasicSweeper would launch, and the hydra config of the sweep."""
    hcfg = hydra_compose([f"experiment={experiment}"], hydra=True).hydra
    params = [f"{k}={v}" for k, v in hcfg.sweeper.params.items()]
    parser = OverridesParser.create()
    [jobs] = BasicSweeper.split_arguments(parser.parse_overrides([f"experiment={experiment}", *params]), None)
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
    assert hcfg.sweep.dir.endswith(f"/{TAG.get(experiment, experiment)}")
    # compose every job of small sweeps; for paper-scale ones every setting once and every model once
    first = {o.split("=", 1)[0]: o for o in jobs[0]}
    sample = jobs if len(jobs) <= 8 else [j for j in jobs if len(set(j) - set(first.values())) <= 1]
    for job in sample:
        cfg = hydra_compose(job)
        kv = dict(o.split("=", 1) for o in job)
        assert cfg.tag == TAG.get(experiment, experiment) and cfg.model.name == kv["model"]
        if settings:
            assert cfg.method.name == SETTING_METHOD[kv["setting"]]
            for b in (2, 3):
                if f"_w{b}" in kv["setting"]:
                    assert cfg.method.wbits == b
            if "_o1" in kv["setting"]:
                assert cfg.method.target_outlier_fraction == 0.01
            if "_g128" in kv["setting"]:
                assert cfg.method.groupsize == 128
            if kv["setting"] in SETTING_SOURCE:
                key, opts = SETTING_SOURCE[kv["setting"]]
                assert {k: cfg.method[key][k] for k in opts} == opts
            if "calib.seed" in kv:
                assert cfg.calib.seed == int(kv["calib.seed"])
        else:
            assert cfg.method.name == "oac_spqr" and cfg.method.oac.refresh == kv["method.oac.refresh"]
        assert cfg.device == ("cuda" if experiment in ("table1", "table2", "table3", "ablation", "main", "hessians")
                              else "cpu")


@pytest.mark.parametrize("oac,backbone", [("oac_spqr_w2_o1", "spqr_w2_o1"), ("oac_spqr_w2_o1_once", "spqr_w2_o1"),
                                          ("oac_billm", "billm"), ("oac_billm_once", "billm"),
                                          ("oac_spqr_w2", "spqr_w2")])
def test_oac_settings_pair_with_their_backbone(hydra_compose, oac, backbone):
    """The seed report pairs an OAC job with its backbone job; they must differ only in the Hessian source."""
    from omegaconf import OmegaConf

    from oac.rows import pair_key

    a, b = ({k: v for k, v in OmegaConf.to_container(hydra_compose(["experiment=main_cpu", f"setting={s}"]),
                                                       resolve=True).items()} for s in (oac, backbone))
    assert a["method"]["hessian"] == "output_adaptive" and b["method"]["hessian"] == "layerwise"
    assert a["calib"] == b["calib"] and pair_key(a) == pair_key(b)
    c = hydra_compose(["experiment=main_cpu", f"setting={backbone}", "method.percdamp=0.5"])
    assert pair_key(OmegaConf.to_container(c, resolve=True)) != pair_key(b)  # a solver setting breaks the pair


def test_slurm_launcher_resolves_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "experiments.run", "experiment=table2", "hydra/launcher=slurm",
                          "--cfg", "all", "--resolve"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SlurmLauncher" in out.stdout and "partition:" in out.stdout and "export HF_HUB_OFFLINE=" in out.stdout


def test_jitter_replicates_share_the_sweep_dir_but_no_job_dir(hydra_compose):
    parser = OverridesParser.create()

    def dirs(experiment):
        jobs, hcfg = expand(hydra_compose, experiment)
        d = hcfg.job.config.override_dirname
        return hcfg.sweep.dir, {get_overrides_dirname(parser.parse_overrides(j), list(d.exclude_keys), d.item_sep,
                                                      d.kv_sep) for j in jobs}

    (main_dir, main), (jit_dir, jit) = dirs("main_cpu"), dirs("main_cpu_jitter")
    assert main_dir == jit_dir and not main & jit and all("jitter_seed=" in d for d in jit)
