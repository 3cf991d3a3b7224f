# The two set-up commands are `make run` and `make test`; everything else is here for them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
MODELS_DIR := models
CONFIG ?= configs/default.yaml
HOST ?= 127.0.0.1
PORT ?= 8000
# One torch thread unless told otherwise: the machines are shared and 2-thread OpenMP collapses under load.
export ENGINE_BUILDER_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv models test test-fast run lint bench bench-gpu soak clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev,storage,models]'
	# xgrammar declares triton as a dependency (the dev extras pin it); xgrammar itself needs no GPU.
	$(BIN)/pip install -q --no-deps 'xgrammar==0.2.8'
	$(BIN)/pip install -q 'apache-tvm-ffi'
	# instructor caps jiter below what openai needs (pyproject.toml, dev extras); it runs on openai's jiter.
	$(BIN)/pip install -q --no-deps 'instructor==1.17.0'
	touch $@

venv: $(BIN)/.installed

$(MODELS_DIR)/.all-ready: $(BIN)/.installed engine_builder/build/default_models.py
	$(BIN)/python -m engine_builder.build.default_models --out $(MODELS_DIR)
	touch $@

models: $(MODELS_DIR)/.all-ready

test: venv models
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

run: venv models
	$(BIN)/engine-builder run $(CONFIG) --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check engine_builder tests benchmarks
	$(BIN)/mypy

bench: venv models
	$(BIN)/python -m benchmarks.run_all

# On a CUDA machine: parity, the Llama-3.1-8B shape (dummy weights) at concurrency 1/16/64, transformers generate().
bench-gpu: venv models
	$(BIN)/python -m benchmarks.gpu

soak: venv models
	$(BIN)/python -m tests.reliability.soak --minutes 30 --report benchmarks/results/soak.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
