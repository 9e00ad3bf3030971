"""Stage configs: frozen dataclasses loaded from configs/<profile>/<stage>.yaml.

Every value can be overridden with `key=value` (dotted keys reach nested sections,
values are parsed as YAML), and every unknown key or wrongly typed value is an error
that names it, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
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
class BertShape:
    num_layers: int = 2  # transformer blocks
    hidden_size: int = 64  # width of the residual stream
    num_heads: int = 2  # attention heads per layer (hidden_size % num_heads == 0)
    ffn_size: int = 128  # intermediate width of each feed-forward block


@dataclass(frozen=True)
class SquadDataConfig:
    train_file: str = "../shared/data/squad/train-subset-v1.1.json"  # fine-tuning questions
    eval_file: str = "../shared/data/squad/dev-a-v1.1.json"  # evaluation only, never trained on
    train_questions: int = 0  # first N training questions in file order; 0 = all
    eval_questions: int = 0  # first N evaluation questions in file order; 0 = all


@dataclass(frozen=True)
class SquadFeatureConfig:
    max_seq_len: int = 384  # tokens per window: [CLS] question [SEP] context-slice [SEP]
    doc_stride: int = 128  # tokens shared by consecutive windows of a long context
    n_best: int = 20  # start and end candidates kept per window in post-processing
    max_answer_len: int = 30  # longest answer span, in tokens


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 2.0  # passes over the training features (fractions allowed)
    batch_size: int = 16  # features per optimizer step
    learning_rate: float = 5e-5  # peak AdamW learning rate after warm-up
    weight_decay: float = 0.01  # AdamW decay, not applied to biases and LayerNorm
    warmup_ratio: float = 0.1  # fraction of steps with a linear warm-up, then linear decay
    max_grad_norm: float = 1.0  # gradient clipping
    bf16: bool = True  # bfloat16 autocast for the encoder's forward (weights stay fp32)
    eval_batch_size: int = 64  # features per forward pass during evaluation
    checkpoint_every: int = 200  # optimizer steps between resumable checkpoints
    threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)


@dataclass(frozen=True)
class TeacherConfig:
    seed: int = 42
    init: str = "minilm"  # "minilm": all-MiniLM-L6-v2 from its package; "random": random BERT of `random_shape`
    random_shape: BertShape = field(default_factory=BertShape)
    data: SquadDataConfig = field(default_factory=SquadDataConfig)
    features: SquadFeatureConfig = field(default_factory=SquadFeatureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.init not in ("minilm", "random"):
            raise ConfigError(f"init: must be 'minilm' or 'random', got {self.init!r}")
        _check_features(self.features)


def _check_features(f: SquadFeatureConfig) -> None:
    if not 0 <= f.doc_stride < f.max_seq_len // 2:
        raise ConfigError(
            f"features.doc_stride: must be in [0, max_seq_len/2), got {f.doc_stride} "
            f"with max_seq_len {f.max_seq_len}"
        )


@dataclass(frozen=True)
class CompileConfig:
    seq_len: int = 128  # static sequence length of the compiled module (one bucket)
    trials: int = 0  # MetaSchedule trials for kernels not yet in the device's tuning database; 0 = reuse only
    max_trials_per_task: int = 64  # cap per kernel, so every new kernel gets a share of `trials`
    fast_math: bool = True  # polynomial erf (GELU), exp (softmax); held to `numerics_tol`
    numerics_tol: float = 1e-3  # max abs difference of start/end logits vs PyTorch fp32
    peers: tuple[str, ...] = ("onnxruntime", "onnxruntime-int8", "litert", "litert-int8")  # peer exports
    tuning_dir: str = "outputs/tuning"  # per-device tuning databases live in <tuning_dir>/<device key>/


@dataclass(frozen=True)
class BenchConfig:
    warmup: int = 10  # untimed runs before timing (caches, thread pools, lazy allocation)
    runs: int = 50  # timed runs; p50/p90/min are over these
    seq_lens: tuple[int, ...] = (128, 384)  # `make bench`: sequence lengths of the suite
    devices: tuple[str, ...] = ("x86-1t", "x86-2t")  # `make bench`: device keys of the suite


@dataclass(frozen=True)
class SpaceConfig:
    """Allowed subnet values (canao/space.py says why these: shapes the compiler handles well)."""

    layer_counts: tuple[int, ...] = (2, 3, 4, 5, 6)  # kept teacher blocks, evenly spaced
    hidden_sizes: tuple[int, ...] = (128, 192, 256, 320, 384)  # residual widths
    head_counts: tuple[int, ...] = (2, 4, 6, 8, 10, 12)  # attention heads per layer (head size stays the teacher's)
    ffn_sizes: tuple[int, ...] = (256, 512, 768, 1024, 1280, 1536)  # FFN widths per layer
    align: int = 64  # every hidden and FFN width must be a multiple of this (vector and tile sizes)


@dataclass(frozen=True)
class KDConfig:
    temperature: float = 2.0  # softens start/end distributions; the soft loss is scaled by T^2
    hidden_weight: float = 1.0  # weight of the hidden-state MSE (each kept layer vs its teacher layer)
    hard_weight: float = 0.0  # weight of the gold-span cross-entropy beside the teacher's soft targets

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"kd.temperature: must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class DistillConfig:
    """pretraining-distill: the elastic supernet trained from the teacher."""

    seed: int = 42
    space: SpaceConfig = field(default_factory=SpaceConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    random_subnets: int = 2  # random subnets per step, besides the largest and the smallest (sandwich rule)
    importance_batches: int = 16  # training batches that rank heads and neurons before distilling
    data: SquadDataConfig = field(default_factory=SquadDataConfig)  # train_questions: first N train questions
    features: SquadFeatureConfig = field(default_factory=SquadFeatureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.random_subnets < 0:
            raise ConfigError(f"random_subnets: must be >= 0, got {self.random_subnets}")
        _check_features(self.features)


@dataclass(frozen=True)
class LatencyConfig:
    """The per-device latency model: subnets compiled and measured on a device of the lab."""

    seed: int = 0
    space: SpaceConfig = field(default_factory=SpaceConfig)
    samples: int = 24  # subnets compiled and measured (the largest and the smallest among them)
    holdout: int = 6  # of those, measured but not fitted on: the model's reported error is on these
    backends: tuple[str, ...] = ("tvm", "litert")  # one latency model each; the search uses the fastest
    compile: CompileConfig = field(default_factory=CompileConfig)  # seq_len is the latency's sequence length
    bench: BenchConfig = field(default_factory=BenchConfig)  # warmup and runs of every measurement

    def __post_init__(self):
        if self.samples < 4 or not 1 <= self.holdout <= self.samples - 3:
            raise ConfigError(f"samples/holdout: need samples >= 4 and 1 <= holdout <= samples - 3 "
                              f"(got {self.samples}, {self.holdout})")
        bad = sorted(set(self.backends) - {"tvm", *self.compile.peers})
        if bad or not self.backends:
            raise ConfigError(f"backends: {bad or 'none'}: every backend must be tvm or one of compile.peers "
                              f"({', '.join(self.compile.peers)})")


@dataclass(frozen=True)
class SearchConfig:
    """Multi-objective search (NSGA-II): F1 with supernet weights vs predicted latency."""

    seed: int = 0
    trials: int = 200  # subnets evaluated
    population_size: int = 24  # NSGA-II generation size
    latency_budget_ms: float = 0.0  # predicted latency must not exceed this; 0 = no budget
    params_budget: int = 0  # parameters must not exceed this; 0 = no budget
    val_questions: int = 500  # the LAST N training questions: held out of distillation, scored each trial
    eval_batch_size: int = 64  # windows per forward pass
    remeasure: int = 8  # front points compiled and measured on the device (highest F1 first)

    def __post_init__(self):
        if self.trials < 1 or self.population_size < 2 or self.val_questions < 1:
            raise ConfigError("trials, val_questions: must be >= 1; population_size: >= 2")


@dataclass(frozen=True)
class FinalizeConfig:
    """The chosen front point: extracted, fine-tuned by distillation, scored, compiled, benchmarked."""

    seed: int = 42
    kd: KDConfig = field(default_factory=KDConfig)
    data: SquadDataConfig = field(default_factory=SquadDataConfig)  # fine-tune and evaluation questions
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: bool = True  # compile the student for the search's device and time it against the peers
    bench_backends: tuple[str, ...] = ("tvm", "litert")  # backends timed for the student and the teacher


STAGES: dict[str, type] = {"teacher": TeacherConfig, "compile": CompileConfig, "bench": BenchConfig,
                           "distill": DistillConfig, "latency": LatencyConfig, "search": SearchConfig,
                           "finalize": FinalizeConfig}


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


def load_config(stage: str, profile: str | None = None, file: str | os.PathLike | None = None,
                overrides: typing.Iterable[str] = ()):
    """Load the config of `stage` from an explicit file or the profile's file, then overrides."""
    if stage not in STAGES:
        raise ConfigError(f"stage: unknown {stage!r} (known: {', '.join(STAGES)})")
    path = Path(file) if file else config_path(stage, profile or "quick")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return from_dict(STAGES[stage], apply_overrides(data, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg) -> str:
    """Stable content hash of a config: what a checkpoint or a cached stage was made with."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
