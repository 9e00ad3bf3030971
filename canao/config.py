"""The config machinery every stage uses, and the configs both task families share.

Stage configs are frozen dataclasses loaded from configs/<profile>/<stage>.yaml
(canao.profiles maps a stage to its class; each wing's `config.py` defines its own). Every
value can be overridden with `key=value` (dotted keys reach nested sections, values are
parsed as YAML), and every unknown key or wrongly typed value is an error that names it,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

# Relative paths in configs (data files) are relative to the project root, so a config
# means the same thing from any working directory.
PROJECT_ROOT = Path(os.environ.get("CANAO_PROJECT_ROOT", Path(__file__).resolve().parents[1]))
CONFIG_DIR = PROJECT_ROOT / "configs"
PROFILES = ("tiny", "quick", "full")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def resolve_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 2.0  # passes over the training features (fractions allowed)
    batch_size: int = 16  # features per optimizer step
    learning_rate: float = 5e-5  # peak AdamW learning rate after warm-up
    weight_decay: float = 0.01  # AdamW decay, not applied to biases and LayerNorm
    warmup_ratio: float = 0.1  # fraction of steps with a linear warm-up, then linear decay
    max_grad_norm: float = 1.0  # gradient clipping
    # bfloat16 autocast of the forward pass (weights stay fp32): "auto" only where the CPU or GPU computes
    # bfloat16 natively (emulated it is ~20x slower than fp32), true or false to force it (canao.hardware)
    bf16: bool | str = "auto"
    eval_batch_size: int = 64  # features per forward pass during evaluation
    checkpoint_every: int = 200  # optimizer steps between resumable checkpoints
    threads: int = 0  # torch intra-op threads; 0 = one per core this process may run on
    # > 0: each epoch's batches are cut from pools of this many batches' windows sorted by length, so a
    # batch pads little (every window still once per epoch, batches in random order); 0 = random batches
    length_pool: int = 0

    def __post_init__(self):
        if self.bf16 not in (True, False, "auto"):
            raise ConfigError(f"train.bf16: must be auto, true or false, got {self.bf16!r}")
        if self.threads < 0:
            raise ConfigError(f"train.threads: must be >= 0, got {self.threads}")
        if self.length_pool < 0:
            raise ConfigError(f"train.length_pool: must be >= 0, got {self.length_pool}")


@dataclass(frozen=True)
class KDConfig:
    temperature: float = 2.0  # softens the output distributions (QA start/end, LM next token); loss scaled by T^2
    hidden_weight: float = 1.0  # weight of the hidden-state MSE (each kept layer vs its teacher layer)
    hard_weight: float = 0.0  # weight of the gold labels' cross-entropy (QA: the span; LM: the next token)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"kd.temperature: must be > 0, got {self.temperature}")


# A tuning database, a latency model or a latency stage's measurements made on other hardware than
# the device's is refused (canao.hardware.check_same); true uses it anyway, priced and tuned for
# that other CPU (a what-if, or a machine known to be alike).
REUSE_OTHER_HARDWARE = False


# How a generation model directory may run: llama.cpp on its GGUF export, PyTorch, or "auto"
# (the caller's rule: `canao generate` takes llama.cpp where there is an export, serving where
# finalize-lm scored it within lm_perplexity_tol).
LM_DIR_BACKENDS = ("auto", "llama.cpp", "torch")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # bind address; 0.0.0.0 only inside a container
    port: int = 8000
    backend: str = "auto"  # a compiled artifact's backend by name, or "auto": the fastest of those that match
    #                        PyTorch within the artifact's numerics_tol (int8 ones do not), timed at start-up
    device: str = ""  # device key (device_lab/devices.yaml) whose compiled artifact a registry model (--model
    #                   NAME@ALIAS) serves; "" = the only one the version holds
    registry_cache: str = "outputs/registry"  # where registry models are pulled (env CANAO_REGISTRY_CACHE overrides)
    resolve_timeout_s: float = 60.0  # a registry model not resolved and pulled by then: the server stops (exit 1)
    threads: int = 0  # inference threads; 0 = one per core this process may run on
    max_body_bytes: int = 65536  # larger request bodies get 413 before they are read whole
    body_timeout_s: float = 10.0  # a body not received whole by then gets 408 and its connection closed
    max_connections: int = 64  # open connections (and their requests) at once; one more gets 503 at once
    # Host header values answered (a leading "*." matches any subdomain); any other gets 400, so a
    # page on another origin cannot reach this server through DNS rebinding.
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    max_context_chars: int = 20000  # longer contexts get 422; a context is split into windows, each a forward pass
    max_question_chars: int = 500  # longer questions get 422 (a question must also fit in one window)
    max_pending: int = 8  # requests admitted at once, computing or queued; one more gets 429 at once
    request_timeout_s: float = 10.0  # a request not answered by then (queueing included) gets 503
    max_prompt_chars: int = 4000  # longer generation prompts get 422; a prompt over the context window in
    #                               tokens is cut from the left (and the final event says so)
    max_new_tokens: int = 256  # a larger max_new_tokens gets 422, as does one the model's context window cannot hold
    generate_timeout_s: float = 60.0  # a generation with no token by then (queueing included) gets 503; one
    #                                   still streaming by then ends with an error event
    lm_backend: str = "auto"  # how a generation model directory runs: "llama.cpp" (its GGUF export), "torch", or
    #                          "auto": llama.cpp where the manifest holds the GGUF's held-out perplexity (finalize-lm
    #                          measures it in llama.cpp) within lm_perplexity_tol of PyTorch's, else PyTorch
    lm_perplexity_tol: float = 0.05  # relative: llama.cpp's quantized file may score at most 5 % above PyTorch

    def __post_init__(self):
        for name in ("max_body_bytes", "max_context_chars", "max_question_chars", "max_pending", "max_prompt_chars",
                     "max_new_tokens", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "generate_timeout_s", "body_timeout_s", "resolve_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0, got {self.threads}")
        if self.lm_backend not in LM_DIR_BACKENDS:
            raise ConfigError(f"lm_backend: must be one of {', '.join(LM_DIR_BACKENDS)}, got {self.lm_backend!r}")
        if self.lm_perplexity_tol < 0:
            raise ConfigError(f"lm_perplexity_tol: must be >= 0, got {self.lm_perplexity_tol}")
        if not self.allowed_hosts or not all(h and "/" not in h and " " not in h for h in self.allowed_hosts):
            raise ConfigError(f"allowed_hosts: host names (\"*.example.org\" for its subdomains), got "
                              f"{list(self.allowed_hosts)}")


LOADTEST_TASKS = ("qa", "generate")  # the serving tasks a load test targets, as /v1/info names them


@dataclass(frozen=True)
class LoadtestConfig:
    data_file: str = "../shared/data/squad/dev-a-v1.1.json"  # the questions the clients ask, in file order
    questions: int = 200  # distinct questions, asked round-robin
    clients: tuple[int, ...] = (1, 4, 16)  # one scenario per count of concurrent clients, in turn
    seconds: float = 30.0  # each scenario stops sending after this long
    max_requests: int = 10000  # ... or after this many requests, whichever comes first
    client_timeout_s: float = 60.0  # a request unanswered by then counts as an error (the server must not hang)
    task: str = "qa"  # the endpoint: qa (POST /v1/qa) or generate (POST /v1/generate, `canao loadtest --lm-model`)
    max_new_tokens: int = 32  # generate: greedy tokens asked for per request

    def __post_init__(self):
        if self.task not in LOADTEST_TASKS:
            raise ConfigError(f"task: expected one of {', '.join(LOADTEST_TASKS)}, got {self.task!r}")
        for name in ("questions", "max_requests", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.clients or min(self.clients) < 1:
            raise ConfigError(f"clients: must be counts >= 1, got {list(self.clients)}")
        for name in ("seconds", "client_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class DeployConfig:
    model_name: str = "canao-qa"  # registry name: s3://<bucket>/models/<model_name>/<version>/, and MLflow's
    bucket: str = "canao"  # S3 bucket of the registry (endpoint and credentials come from the environment)
    alias: str = "production"  # MLflow Model Registry alias moved to the new version, if it passes the gate:
    min_f1: float = 0.0  # its dev F1 at least this (0: no floor), and no lower than the alias holder's
    max_p50_ms: float = 0.0  # its p50 latency on the device at most this (0: no ceiling)
    # Which measured backend serves: the fastest whose start/end logits stay within a bound of
    # PyTorch fp32: the compile stage's numerics_tol for fp32 backends, this looser one for int8
    # backends (quantization moves logits by design; a bound this size keeps the answer spans).
    int8_numerics_tol: float = 0.5

    def __post_init__(self):
        if not 0 <= self.min_f1 <= 100:
            raise ConfigError(f"min_f1: must be an F1 in [0, 100], got {self.min_f1}")
        if not self.max_p50_ms >= 0:
            raise ConfigError(f"max_p50_ms: must be >= 0 (0 = no ceiling), got {self.max_p50_ms}")


def check_samples(samples: int, holdout: int) -> None:
    if samples < 4 or not 1 <= holdout <= samples - 3:
        raise ConfigError(f"samples/holdout: need samples >= 4 and 1 <= holdout <= samples - 3 "
                          f"(got {samples}, {holdout})")


def check_min_speedup(min_speedup: float) -> None:
    if not min_speedup >= 0:  # also refuses NaN
        raise ConfigError(f"min_speedup: must be >= 0 (0 = none), got {min_speedup}")


def from_dict(cls: type, data: dict, where: str = "") -> typing.Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {e}") from e


def _coerce(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if isinstance(tp, types.UnionType):  # e.g. bool | str: the value must be one of them as it is
        if type(value) not in typing.get_args(tp):
            names = " or ".join(t.__name__ for t in typing.get_args(tp))
            raise ConfigError(f"{where}: expected {names}, got {value!r}")
        return value
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item, _) = typing.get_args(tp)
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads 1e-4 (no dot) as a string; it is a float to anyone writing a config.
        with contextlib.suppress(ValueError):
            return float(value)
    if type(value) is not tp:
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Return a copy of `data` with `a.b=value` overrides applied (values parsed as YAML)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def config_path(stage: str, profile: str) -> Path:
    if profile not in PROFILES:
        raise ConfigError(f"profile: unknown {profile!r} (known: {', '.join(PROFILES)})")
    return CONFIG_DIR / profile / f"{stage}.yaml"


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg) -> str:
    """Stable content hash of a config: what a checkpoint or a cached stage was made with."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
