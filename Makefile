# Two commands on a fresh machine: `make run` and `make test`; each runs `setup` first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= quick
OUT ?= outputs/$(PROFILE)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test run bench lint clean

setup: $(STAMP)

# Reinstalls only when pyproject.toml changed. torch==2.13.0 resolves to the CPU wheel on
# local disk (see README: never a CUDA build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q tests

# The main job. Until the pipeline lands: the quick teacher, trained and scored on dev-a.
run: setup
	$(BIN)/canao teacher --profile $(PROFILE) --out $(OUT)/teacher

bench: setup
	@echo "make bench: the benchmark suite (BENCHMARKS.md) comes with the compiler stage; nothing to run yet" >&2
	@exit 1

lint: setup
	$(BIN)/ruff check canao tests

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
