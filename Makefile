# Two commands on a fresh machine: `make run` and `make test`; each runs `setup` first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= quick
OUT ?= outputs/$(PROFILE)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup litert-env test run bench lint clean

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

# The main job. Until the pipeline lands: the quick teacher, trained and scored on dev-a, then
# CANAO on x86-1t: supernet, latency model (device lab up for it), search, the student.
DEVICE ?= x86-1t
run: setup litert-env
	$(BIN)/canao teacher --profile $(PROFILE) --out $(OUT)/teacher
	$(BIN)/canao distill --profile $(PROFILE) --teacher $(OUT)/teacher --out $(OUT)/supernet
	$(BIN)/canao device-lab up
	$(BIN)/canao latency --profile $(PROFILE) --device $(DEVICE) --teacher $(OUT)/teacher --out $(OUT)/latency-$(DEVICE) \
	  && $(BIN)/canao search --profile $(PROFILE) --supernet $(OUT)/supernet --latency $(OUT)/latency-$(DEVICE) \
	     --out $(OUT)/search-$(DEVICE) \
	  && $(BIN)/canao finalize --profile $(PROFILE) --teacher $(OUT)/teacher --supernet $(OUT)/supernet \
	     --search $(OUT)/search-$(DEVICE) --out $(OUT)/student-$(DEVICE); \
	  status=$$?; $(BIN)/canao device-lab down; exit $$status

bench: setup litert-env
	$(BIN)/canao device-lab up
	$(BIN)/canao bench-suite --profile full --out BENCHMARKS.md; status=$$?; $(BIN)/canao device-lab down; exit $$status

lint: setup
	$(BIN)/ruff check canao tests

clean:
	rm -rf $(VENV) $(LITERT_VENV) build .pytest_cache .ruff_cache
