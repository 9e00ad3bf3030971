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
import types
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
    # bfloat16 autocast of the forward pass (weights stay fp32): "auto" only where the CPU or GPU computes
    # bfloat16 natively (emulated it is ~20x slower than fp32), true or false to force it (canao.hardware)
    bf16: bool | str = "auto"
    eval_batch_size: int = 64  # features per forward pass during evaluation
    checkpoint_every: int = 200  # optimizer steps between resumable checkpoints
    threads: int = 0  # torch intra-op threads; 0 = one per core this process may run on

    def __post_init__(self):
        if self.bf16 not in (True, False, "auto"):
            raise ConfigError(f"train.bf16: must be auto, true or false, got {self.bf16!r}")
        if self.threads < 0:
            raise ConfigError(f"train.threads: must be >= 0, got {self.threads}")


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


# A tuning database, a latency model or a latency stage's measurements made on other hardware than
# the device's is refused (canao.hardware.check_same); true uses it anyway, priced and tuned for
# that other CPU (a what-if, or a machine known to be alike).
REUSE_OTHER_HARDWARE = False


@dataclass(frozen=True)
class CompileConfig:
    seq_len: int = 128  # static sequence length of the compiled module (one bucket)
    trials: int = 0  # MetaSchedule trials for kernels not yet in the device's tuning database; 0 = reuse only
    max_trials_per_task: int = 64  # cap per kernel, so every new kernel gets a share of `trials`
    fast_math: bool = True  # polynomial erf (GELU), exp (softmax); held to `numerics_tol`
    numerics_tol: float = 1e-3  # max abs difference of start/end logits vs PyTorch fp32
    peers: tuple[str, ...] = ("onnxruntime", "onnxruntime-int8", "litert", "litert-int8")  # peer exports
    tuning_dir: str = "outputs/tuning"  # per-device tuning databases live in <tuning_dir>/<device key>/
    reuse_other_hardware: bool = REUSE_OTHER_HARDWARE  # see REUSE_OTHER_HARDWARE


@dataclass(frozen=True)
class BenchConfig:
    warmup: int = 10  # untimed runs before timing (caches, thread pools, lazy allocation)
    runs: int = 50  # timed runs; p50/p90/min are over these
    seq_lens: tuple[int, ...] = (128, 384)  # `make bench`: sequence lengths of the suite
    devices: tuple[str, ...] = ("x86-1t", "x86-2t")  # `make bench`: device keys of the suite


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # bind address; 0.0.0.0 only inside a container
    port: int = 8000
    backend: str = "auto"  # a compiled artifact's backend by name, or "auto": the fastest of those that match
    #                        PyTorch within the artifact's numerics_tol (int8 ones do not), timed at start-up
    device: str = ""  # device key (device_lab/devices.yaml) whose compiled artifact a registry model (--model
    #                   NAME@ALIAS) serves; "" = the only one the version holds
    threads: int = 0  # inference threads; 0 = one per core this process may run on
    max_body_bytes: int = 65536  # larger request bodies get 413 before they are read whole
    max_context_chars: int = 20000  # longer contexts get 422; a context is split into windows, each a forward pass
    max_question_chars: int = 500  # longer questions get 422 (a question must also fit in one window)
    max_pending: int = 8  # requests admitted at once, computing or queued; one more gets 429 at once
    request_timeout_s: float = 10.0  # a request not answered by then (queueing included) gets 503
    max_prompt_chars: int = 4000  # longer generation prompts get 422; a prompt over the context window in
    #                               tokens is cut from the left (and the final event says so)
    max_new_tokens: int = 256  # a larger max_new_tokens gets 422, as does one the model's context window cannot hold
    generate_timeout_s: float = 60.0  # a generation with no token by then (queueing included) gets 503; one
    #                                   still streaming by then ends with an error event

    def __post_init__(self):
        for name in ("max_body_bytes", "max_context_chars", "max_question_chars", "max_pending", "max_prompt_chars",
                     "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "generate_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0, got {self.threads}")


@dataclass(frozen=True)
class LoadtestConfig:
    data_file: str = "../shared/data/squad/dev-a-v1.1.json"  # the questions the clients ask, in file order
    questions: int = 200  # distinct questions, asked round-robin
    clients: tuple[int, ...] = (1, 4, 16)  # one scenario per count of concurrent clients, in turn
    seconds: float = 30.0  # each scenario stops sending after this long
    max_requests: int = 10000  # ... or after this many requests, whichever comes first
    client_timeout_s: float = 60.0  # a request unanswered by then counts as an error (the server must not hang)

    def __post_init__(self):
        for name in ("questions", "max_requests"):
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
    alias: str = "production"  # MLflow Model Registry alias moved to the new version
    # Which measured backend serves: the fastest whose start/end logits stay within a bound of
    # PyTorch fp32: the compile stage's numerics_tol for fp32 backends, this looser one for int8
    # backends (quantization moves logits by design; a bound this size keeps the answer spans).
    int8_numerics_tol: float = 0.5


@dataclass(frozen=True)
class DecoderShape:
    num_layers: int = 2  # decoder blocks
    hidden_size: int = 64  # width of the residual stream
    num_heads: int = 4  # query heads per layer (hidden_size % num_heads == 0)
    num_kv_heads: int = 2  # key/value heads per layer, each shared by num_heads / num_kv_heads query heads
    ffn_size: int = 128  # intermediate width of each gated (SwiGLU) feed-forward block

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"random_shape: hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                              f"({self.num_heads}), and num_heads of num_kv_heads ({self.num_kv_heads})")


@dataclass(frozen=True)
class LMTeacherConfig:
    seed: int = 42
    init: str = "smollm2"  # "smollm2": SmolLM2-135M-Instruct from its GGUF package; "random": a random Llama
    random_shape: DecoderShape = field(default_factory=DecoderShape)  # shape of the "random" decoder

    def __post_init__(self):
        if self.init not in ("smollm2", "random"):
            raise ConfigError(f"init: must be 'smollm2' or 'random', got {self.init!r}")


@dataclass(frozen=True)
class LMDataConfig:
    wikitext_file: str = "../shared/data/text/wikitext-2-raw-test-a.txt"  # WikiText-2 raw articles
    squad_file: str = "../shared/data/squad/train-subset-v1.1.json"  # its paragraphs join the training text
    heldout_articles: int = 10  # the file's last N WikiText articles: held out for perplexity, never trained on
    max_train_chars: int = 0  # cut the training text to its first N characters; 0 = all


@dataclass(frozen=True)
class LMCompileConfig:
    max_context: int = 640  # tokens the static KV cache holds (prompt + generated); attention always spans it
    prefill_len: int = 64  # tokens per compiled prefill call; longer prompts take several calls
    trials: int = 0  # MetaSchedule trials for kernels not yet in the device's tuning database; 0 = reuse only
    max_trials_per_task: int = 64  # cap per kernel, so every new kernel gets a share of `trials`
    fast_math: bool = True  # TVM's polynomial exp (softmax, SiLU); held to `numerics_tol`
    numerics_tol: float = 1e-3  # max abs difference of next-token logits vs PyTorch fp32
    tuning_dir: str = "outputs/tuning"  # per-device tuning databases live in <tuning_dir>/<device key>/
    reuse_other_hardware: bool = REUSE_OTHER_HARDWARE  # see REUSE_OTHER_HARDWARE

    def __post_init__(self):
        # A padded last prefill chunk must stay inside the cache (its positions index the RoPE tables).
        if not 1 <= self.prefill_len <= self.max_context or self.max_context % self.prefill_len:
            raise ConfigError(f"prefill_len: must divide max_context ({self.max_context}), got {self.prefill_len}")


@dataclass(frozen=True)
class GenBenchConfig:
    contexts: tuple[int, ...] = (128, 512)  # prompt lengths in tokens: time to first token, then ms/token after it
    new_tokens: int = 32  # tokens generated (greedy, EOS ignored) per measurement
    repeats: int = 3  # measurements per backend and context; the table reports medians over them
    devices: tuple[str, ...] = ("x86-1t",)  # device keys (local ones: every backend runs pinned to its cores)
    perplexity_tokens: int = 4096  # `make bench`: held-out tokens behind each model's perplexity; 0 = all


@dataclass(frozen=True)
class SpaceConfig:
    """Allowed subnet values (canao/space.py says why these: shapes the compiler handles well)."""

    layer_counts: tuple[int, ...] = (2, 3, 4, 5, 6)  # kept teacher blocks, evenly spaced
    hidden_sizes: tuple[int, ...] = (128, 192, 256, 320, 384)  # residual widths
    head_counts: tuple[int, ...] = (2, 4, 6, 8, 10, 12)  # attention heads per layer (head size stays the teacher's)
    ffn_sizes: tuple[int, ...] = (256, 512, 768, 1024, 1280, 1536)  # FFN widths per layer
    align: int = 64  # every hidden and FFN width must be a multiple of this (vector and tile sizes)


@dataclass(frozen=True)
class DecoderSpaceConfig:
    """Allowed decoder subnets (canao/space.py says why these: shapes the compiler handles well)."""

    layer_counts: tuple[int, ...] = (6, 10, 14, 18, 22, 26, 30)  # kept teacher blocks, evenly spaced
    kv_head_counts: tuple[int, ...] = (1, 2, 3)  # key/value heads per layer, each with its query heads
    ffn_sizes: tuple[int, ...] = (256, 512, 768, 1024, 1280, 1536)  # FFN (gated) widths, one for every layer
    align: int = 64  # FFN widths and key/value widths must be multiples of this (vector and tile sizes)


@dataclass(frozen=True)
class KDConfig:
    temperature: float = 2.0  # softens the output distributions (QA start/end, LM next token); loss scaled by T^2
    hidden_weight: float = 1.0  # weight of the hidden-state MSE (each kept layer vs its teacher layer)
    hard_weight: float = 0.0  # weight of the gold labels' cross-entropy (QA: the span; LM: the next token)

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


TORCH_DEVICES = ("cpu", "cuda")  # where the decoder stages run their torch work; the math is the same on both


@dataclass(frozen=True)
class LMDistillConfig:
    """The elastic decoder trained by distillation from the generation teacher on the lm-data corpus."""

    seed: int = 42
    space: DecoderSpaceConfig = field(default_factory=DecoderSpaceConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    random_subnets: int = 2  # random subnets per step, besides the largest and the smallest (sandwich rule)
    importance_batches: int = 16  # training batches that rank KV-head groups and neurons before distilling
    seq_len: int = 256  # tokens per training window: train.txt tokenized once, cut into consecutive windows
    max_windows: int = 0  # train on the first N windows only; 0 = all
    eval_tokens: int = 0  # held-out tokens scored for the manifest's perplexities and KL; 0 = all of heldout.txt
    train: TrainConfig = field(default_factory=TrainConfig)
    torch_device: str = "cpu"  # where the teacher and the trained decoder run: "cpu", or "cuda" (a GPU torch sees)

    def __post_init__(self):
        if self.random_subnets < 0:
            raise ConfigError(f"random_subnets: must be >= 0, got {self.random_subnets}")
        _check_lm_training(self)


def _check_torch_device(device: str) -> None:
    if device not in TORCH_DEVICES:
        raise ConfigError(f"torch_device: must be one of {', '.join(TORCH_DEVICES)}, got {device!r}")


def _check_lm_training(cfg) -> None:
    _check_torch_device(cfg.torch_device)
    for name in ("max_windows", "eval_tokens"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.seq_len < 2:
        raise ConfigError(f"seq_len: must be >= 2 (a window predicts its tokens from earlier ones), got {cfg.seq_len}")


@dataclass(frozen=True)
class LMFinalizeConfig:
    """The chosen generation front point: extracted, fine-tuned by distillation from the teacher, scored."""

    seed: int = 42
    kd: KDConfig = field(default_factory=KDConfig)
    seq_len: int = 256  # tokens per training window: train.txt tokenized once, cut into consecutive windows
    max_windows: int = 0  # train on the first N windows only; 0 = all
    eval_tokens: int = 0  # held-out tokens scored for the student's and the teacher's perplexity; 0 = all
    train: TrainConfig = field(default_factory=TrainConfig)
    torch_device: str = "cpu"  # where the teacher and the student run: "cpu", or "cuda" (a GPU torch sees)

    def __post_init__(self):
        _check_lm_training(self)


def _check_samples(samples: int, holdout: int) -> None:
    if samples < 4 or not 1 <= holdout <= samples - 3:
        raise ConfigError(f"samples/holdout: need samples >= 4 and 1 <= holdout <= samples - 3 "
                          f"(got {samples}, {holdout})")


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
        _check_samples(self.samples, self.holdout)
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
    # ...nor the teacher's shape on LiteRT fp32 (the peer to beat, as the latency stage measured it on
    # this device) divided by this: a budget that holds on any machine; 0 = none. The tighter one applies.
    min_speedup: float = 0.0
    params_budget: int = 0  # parameters must not exceed this; 0 = no budget
    val_questions: int = 500  # the LAST N training questions: held out of distillation, scored each trial
    eval_batch_size: int = 64  # windows per forward pass
    remeasure: int = 8  # front points compiled and measured on the device (highest F1 first)
    reuse_other_hardware: bool = REUSE_OTHER_HARDWARE  # see REUSE_OTHER_HARDWARE (here: the latency model)

    def __post_init__(self):
        if self.trials < 1 or self.population_size < 2 or self.val_questions < 1:
            raise ConfigError("trials, val_questions: must be >= 1; population_size: >= 2")
        _check_min_speedup(self.min_speedup)


def _check_min_speedup(min_speedup: float) -> None:
    if not min_speedup >= 0:  # also refuses NaN
        raise ConfigError(f"min_speedup: must be >= 0 (0 = none), got {min_speedup}")


# The generation backends: TVM (compile-lm), PyTorch eager, llama.cpp (a GGUF file), LiteRT (the
# KV-cache step converted by litert-torch, float32).
GEN_BACKENDS = ("tvm", "torch", "llama.cpp", "litert")


@dataclass(frozen=True)
class LMLatencyConfig:
    """The per-device decode latency model: decoder subnets compiled and timed generating on a local device."""

    seed: int = 0
    space: DecoderSpaceConfig = field(default_factory=DecoderSpaceConfig)
    samples: int = 12  # subnets compiled and timed (the largest and the smallest among them)
    holdout: int = 3  # of those, timed but not fitted on: the model's reported error is on these
    # "tvm" (compile-lm), "torch" (eager) and/or "llama.cpp" (GGUF export); the search uses the fastest
    backends: tuple[str, ...] = ("tvm",)
    compile: LMCompileConfig = field(default_factory=LMCompileConfig)  # max_context: the context the latency is for
    new_tokens: int = 16  # tokens timed per measurement, after a prompt that fills the rest of the cache
    repeats: int = 3  # measurements per subnet and backend; the median is kept

    def __post_init__(self):
        _check_samples(self.samples, self.holdout)
        bad = sorted(set(self.backends) - set(GEN_BACKENDS))
        if bad or not self.backends:
            raise ConfigError(f"backends: {bad or 'none'}: every backend must be one of {', '.join(GEN_BACKENDS)}")
        if not 2 <= self.new_tokens < self.compile.max_context:
            raise ConfigError(f"new_tokens: must be in [2, compile.max_context ({self.compile.max_context})), "
                              f"got {self.new_tokens}")
        if self.repeats < 1:
            raise ConfigError(f"repeats: must be >= 1, got {self.repeats}")


@dataclass(frozen=True)
class LMSearchConfig:
    """Multi-objective search (NSGA-II) for generation: held-out perplexity with supernet weights vs
    predicted ms per generated token."""

    seed: int = 0
    trials: int = 100  # subnets evaluated (the decoder space is small: 7 x 3 x 6 = 126 subnets by default)
    population_size: int = 16  # NSGA-II generation size
    latency_budget_ms: float = 0.0  # predicted ms per token must not exceed this; 0 = no budget
    # ...nor the teacher's shape in llama.cpp (the peer to beat, as latency-lm timed it on this
    # device) divided by this; 0 = none. The tighter one applies.
    min_speedup: float = 0.0
    params_budget: int = 0  # parameters must not exceed this; 0 = no budget
    eval_tokens: int = 4096  # held-out tokens scored per subnet (the supernet's heldout.txt); 0 = all
    remeasure: int = 4  # front points compiled and timed on the device again (lowest perplexity first)
    torch_device: str = "cpu"  # where the subnets are scored: "cpu", or "cuda" (a GPU torch sees); not the
    # device-lab device the latency model times, which the manifest records as `device`
    reuse_other_hardware: bool = REUSE_OTHER_HARDWARE  # see REUSE_OTHER_HARDWARE (here: the latency model)

    def __post_init__(self):
        if self.trials < 1 or self.population_size < 2:
            raise ConfigError("trials: must be >= 1; population_size: >= 2")
        if self.eval_tokens < 0 or self.remeasure < 0:
            raise ConfigError("eval_tokens, remeasure: must be >= 0")
        _check_min_speedup(self.min_speedup)
        _check_torch_device(self.torch_device)


@dataclass(frozen=True)
class FinalizeConfig:
    """The chosen front point: extracted, fine-tuned by distillation, scored, compiled, benchmarked."""

    seed: int = 42
    kd: KDConfig = field(default_factory=KDConfig)
    data: SquadDataConfig = field(default_factory=SquadDataConfig)  # fine-tune and evaluation questions
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: bool = True  # compile the student for the search's device and time it against the peers
    bench_backends: tuple[str, ...] = ("tvm", "litert")  # backends timed for the student and the teacher


STAGES: dict[str, type] = {
    "teacher": TeacherConfig, "distill": DistillConfig, "latency": LatencyConfig, "search": SearchConfig,
    "finalize": FinalizeConfig, "compile": CompileConfig, "bench": BenchConfig, "deploy": DeployConfig,
    "serve": ServeConfig, "loadtest": LoadtestConfig,
    "lm-teacher": LMTeacherConfig, "lm-data": LMDataConfig, "distill-lm": LMDistillConfig,
    "latency-lm": LMLatencyConfig, "search-lm": LMSearchConfig, "finalize-lm": LMFinalizeConfig,
    "compile-lm": LMCompileConfig,
    "bench-lm": GenBenchConfig,
}


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
