# The one image every pipeline component runs in (components/tasks.py base_image): the canao
# package, its configs and device profiles, and the LiteRT converter's own environment.
# Build: `make image` (env CANAO_IMAGE names it). Data is mounted at /shared (k8s PVC).
FROM python:3.11.14-slim-bookworm

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

# torch first, from the CPU-only wheel index: the image must never carry a CUDA build.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY requirements-litert.txt ./
RUN python -m venv /app/.venv-litert \
    && /app/.venv-litert/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
       -r requirements-litert.txt

COPY pyproject.toml README.md ./
COPY canao ./canao
COPY components ./components
COPY pipelines ./pipelines
COPY configs ./configs
COPY device_lab ./device_lab
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu . \
    && useradd --create-home --uid 10001 canao \
    && mkdir -p /app/outputs \
    && chown canao /app/outputs

USER 10001
CMD ["canao", "--help"]
