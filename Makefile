# Two commands on a fresh machine: `make run` and `make test`; each runs `setup` first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= quick
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# llama-cpp-python compiles llama.cpp for this CPU; its AMX kernels, built in on a CPU with AMX,
# crash (SIGSEGV in the first decode) on SmolLM2's GGUF (q4_1 and q8_0 tensors), seen on an Intel
# Xeon with AMX-INT8 on 2026-12-06. Built without them, llama.cpp uses its AVX-512 kernels there.
export CMAKE_ARGS ?= -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8

.PHONY: setup litert-env test fuzz run up down pipelines image bench bench-lm bench-serve bench-serve-lm serve lint clean

setup: $(STAMP)

# Reinstalls only when pyproject.toml changed. torch==2.13.0 resolves to the CPU wheel on
# local disk (see README: never a CUDA build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The LiteRT converter's own environment: litert-torch cannot share one with TVM
# (TOOLCHAIN.md). canao runs the converter scripts (canao.qa.litert, canao.lm.litert) with its
# python, so it holds only what they import. Its pins live in requirements-litert.txt (the Dockerfile uses them too);
# reinstalls when that file changes.
LITERT_VENV := .venv-litert
LITERT_STAMP := $(LITERT_VENV)/.installed

litert-env: $(LITERT_STAMP)

$(LITERT_STAMP): requirements-litert.txt
	test -x $(LITERT_VENV)/bin/python || $(PYTHON) -m venv $(LITERT_VENV)
	$(LITERT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LITERT_VENV)/bin/python -m pip install --quiet -r requirements-litert.txt
	touch $@

# Two workers, a test file each at a time (its module fixtures built once): the serial suite
# kept one of two cores busy on average (a compile, a converter process, a server starting).
# On a fresh clone of the 2-core Intel family 6 model 167, idle: 17 min 36 s of tests on two
# workers (CPU 155 %), against 26 min 28 s serial (99 %) before peers' timing processes stopped
# importing PyTorch (2026-12-07).
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The API against its schema with new random requests each run, FUZZ_EXAMPLES per operation and
# mode; `make test` sends the same 100 every run, so CI never passes or fails by chance.
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	CANAO_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/unit/test_serve_schema.py

# The main job: the canao-compress pipeline (PROFILE, default quick) with kfp's local runner;
# starts MLflow, SeaweedFS and the device lab if they are not running and stops what it started.
# The summary goes to outputs/latest/summary.json. APPS: the chains to run (qa, generation; default
# both). SET: space-separated STAGE:KEY=VALUE overrides, e.g.
# `make run PROFILE=full APPS=qa SET=compile:trials=0`.
DEVICE ?= x86-1t
APPS ?= qa generation
SET ?=
run: setup litert-env
	$(BIN)/python -m pipelines.local --profile $(PROFILE) --device $(DEVICE) $(foreach a,$(APPS),--app $(a)) \
		$(foreach s,$(SET),--set $(s))

# MLflow (http://127.0.0.1:5000) and SeaweedFS S3 (127.0.0.1:8333) and the device lab, left
# running for the UIs; `make down` stops them. `canao services env` prints the client env.
up: setup
	$(BIN)/canao services up
	$(BIN)/canao device-lab up

down: setup
	$(BIN)/canao device-lab down
	$(BIN)/canao services down

# The pipeline as a Kubeflow Pipelines package.
pipelines: setup
	$(BIN)/python -m pipelines.package --out build/canao-compress.yaml

# The components' image, through a Docker engine (fails clearly where none answers).
image: setup
	$(BIN)/python -m components.image

# LM_STUDENT: a `canao finalize-lm` output for the generation table (empty: the teacher only).
LM_STUDENT ?=
bench: setup litert-env
	$(BIN)/canao device-lab up
	$(BIN)/canao bench-suite --profile full $(if $(LM_STUDENT),--lm-student $(LM_STUDENT)) --out BENCHMARKS.md; \
	status=$$?; $(BIN)/canao device-lab down; exit $$status

# The generation section of BENCHMARKS.md alone (the teacher and LM_STUDENT in TVM, PyTorch and
# llama.cpp); the other sections stay as they are.
bench-lm: setup
	$(BIN)/canao device-lab up
	$(BIN)/canao bench-suite --profile full --generation-only $(if $(LM_STUDENT),--lm-student $(LM_STUDENT)) --out BENCHMARKS.md; \
	status=$$?; $(BIN)/canao device-lab down; exit $$status

# The server for a QA model and a generation model (directories or compiled artifacts; empty: none),
# e.g. SERVE_LM_MODEL=outputs/lm-teacher: http://127.0.0.1:8000/
SERVE_MODEL ?= outputs/full/teacher
SERVE_LM_MODEL ?=
serve: setup
	$(BIN)/canao serve --model "$(SERVE_MODEL)" --lm-model "$(SERVE_LM_MODEL)" --profile $(PROFILE)

# Load test on loopback: 1, 4 and 16 concurrent clients for 20 s each against /v1/qa of
# SERVE_MODEL -> outputs/bench-serve.json and .md, and the table into BENCHMARKS.md (make bench keeps it).
bench-serve: setup
	$(BIN)/canao loadtest --profile full --model $(SERVE_MODEL) --out outputs/bench-serve.json --benchmarks BENCHMARKS.md

# The same against /v1/generate of SERVE_LM_MODEL (default: the generation teacher), 32 greedy
# tokens per request -> outputs/bench-serve-lm.json and .md, and its own section of BENCHMARKS.md.
bench-serve-lm: setup
	$(BIN)/canao loadtest --profile full --lm-model $(or $(SERVE_LM_MODEL),outputs/lm-teacher) \
		--out outputs/bench-serve-lm.json --benchmarks BENCHMARKS.md

lint: setup
	$(BIN)/ruff check canao components pipelines tests

clean:
	rm -rf $(VENV) $(LITERT_VENV) build .pytest_cache .ruff_cache
