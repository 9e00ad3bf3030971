# Two commands on a fresh machine: `make run` and `make test`; each runs `setup` first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= quick
OUT ?= outputs/$(PROFILE)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup litert-env test run bench bench-serve serve lint clean

setup: $(STAMP)

# Reinstalls only when pyproject.toml changed. torch==2.13.0 resolves to the CPU wheel on
# local disk (see README: never a CUDA build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The LiteRT converter's own environment: litert-torch cannot share one with TVM
# (TOOLCHAIN.md). canao runs canao/litert_convert.py with its python, so it holds only what
# that script imports; transformers is pinned as in pyproject.toml. Reinstalls when this file
# changes (the pins live here).
LITERT_VENV := .venv-litert
LITERT_STAMP := $(LITERT_VENV)/.installed
LITERT_PACKAGES := torch==2.13.0 transformers==5.23.0 litert-torch==0.10.0 ai-edge-quantizer==0.10.0

litert-env: $(LITERT_STAMP)

$(LITERT_STAMP): Makefile
	test -x $(LITERT_VENV)/bin/python || $(PYTHON) -m venv $(LITERT_VENV)
	$(LITERT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LITERT_VENV)/bin/python -m pip install --quiet $(LITERT_PACKAGES)
	touch $@

test: setup
	$(BIN)/python -m pytest -q tests

# The main job. Until the pipeline lands: the quick teacher, trained and scored on dev-a.
run: setup
	$(BIN)/canao teacher --profile $(PROFILE) --out $(OUT)/teacher

bench: setup litert-env
	$(BIN)/canao device-lab up
	$(BIN)/canao bench-suite --profile full --out BENCHMARKS.md; status=$$?; $(BIN)/canao device-lab down; exit $$status

# The QA server for a model directory or compiled artifact: http://127.0.0.1:8000/
SERVE_MODEL ?= outputs/full/teacher
serve: setup
	$(BIN)/canao serve --model $(SERVE_MODEL) --profile $(PROFILE)

# Load test on loopback: 1, 4 and 16 concurrent clients for 20 s each against /v1/qa of
# SERVE_MODEL -> outputs/bench-serve.json and .md (the table for BENCHMARKS.md).
bench-serve: setup
	$(BIN)/canao loadtest --profile full --model $(SERVE_MODEL) --out outputs/bench-serve.json

lint: setup
	$(BIN)/ruff check canao tests

clean:
	rm -rf $(VENV) $(LITERT_VENV) build .pytest_cache .ruff_cache
