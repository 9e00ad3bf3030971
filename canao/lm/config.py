"""The configs of the generation family's stages: the decoder teacher, its text corpus, the
elastic decoder and its space, the decode latency models, search-lm, finalize-lm,
compile-lm, the generation benchmark and deploy-lm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from canao.config import (
    REUSE_OTHER_HARDWARE,
    ConfigError,
    KDConfig,
    ServeConfig,
    TrainConfig,
    check_min_speedup,
    check_samples,
)


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


DEPTH_RULES = ("influence", "spread")


@dataclass(frozen=True)
class DecoderSpaceConfig:
    """Allowed decoder subnets (canao/codesign/space.py says why these: shapes the compiler handles well)."""

    layer_counts: tuple[int, ...] = (6, 10, 14, 18, 22, 26, 30)  # kept teacher blocks (`depth` says which)
    kv_head_counts: tuple[int, ...] = (1, 2, 3)  # key/value heads per layer, each with its query heads
    ffn_sizes: tuple[int, ...] = (256, 512, 768, 1024, 1280, 1536)  # FFN (gated) widths, one for every layer
    align: int = 64  # FFN widths and key/value widths must be multiples of this (vector and tile sizes)
    # which blocks a shallower subnet keeps: "influence" (the first, the last, then those that change
    # their input most on the corpus; canao.lm.space.keep_order) or "spread" (evenly spaced, the last kept)
    depth: str = "influence"

    def __post_init__(self):
        if self.depth not in DEPTH_RULES:
            raise ConfigError(f"space.depth: {self.depth!r} is not one of {', '.join(DEPTH_RULES)}")


@dataclass(frozen=True)
class LMAugmentConfig:
    """Sequence-level KD text: the teacher's own continuations of training openings (canao.lm.augment)."""

    prompts: int = 0  # openings (paragraphs of train.txt) the teacher continues; 0 = none
    prompt_tokens: int = 32  # tokens of each opening given as the prompt
    new_tokens: int = 128  # tokens sampled after each prompt (fewer where the teacher ends the text)
    temperature: float = 0.8  # sampling temperature: the teacher's distribution, a little sharpened
    top_p: float = 0.95  # nucleus sampling: the smallest set of tokens holding this much probability
    seed: int = 0  # the openings chosen and every sample: one seed, one text (at one thread count)
    threads: int = 0  # llama.cpp threads; 0 = every core (the count is kept with the text)

    def __post_init__(self):
        if min(self.prompts, self.threads) < 0 or min(self.prompt_tokens, self.new_tokens) < 1:
            raise ConfigError("augment.prompts, augment.threads: must be >= 0; augment.prompt_tokens, "
                              f"augment.new_tokens: >= 1; got {self.prompts}, {self.threads}, {self.prompt_tokens}, "
                              f"{self.new_tokens}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"augment.temperature: must be > 0, augment.top_p: in (0, 1]; got {self.temperature}, "
                              f"{self.top_p}")


TORCH_DEVICES = ("cpu", "cuda")  # where the decoder stages run their torch work; the math is the same on both


@dataclass(frozen=True)
class LMDistillConfig:
    """The elastic decoder trained by distillation from the generation teacher on the lm-data corpus."""

    seed: int = 42
    space: DecoderSpaceConfig = field(default_factory=DecoderSpaceConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    random_subnets: int = 2  # random subnets per step, besides the largest and the smallest (sandwich rule)
    augment: LMAugmentConfig = field(default_factory=LMAugmentConfig)  # the teacher's own text, trained on too
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
    # greedy_agreement: the share of the teacher's greedy tokens the student's greedy continuation
    # repeats, over `agreement_tokens` tokens after each of `agreement_prompts` held-out prompts
    agreement_prompts: int = 50  # prompts spread evenly over the held-out text
    agreement_prompt_tokens: int = 32  # tokens per prompt
    agreement_tokens: int = 64  # greedy tokens compared after each prompt
    train: TrainConfig = field(default_factory=TrainConfig)
    torch_device: str = "cpu"  # where the teacher and the student run: "cpu", or "cuda" (a GPU torch sees)

    def __post_init__(self):
        _check_lm_training(self)
        for name in ("agreement_prompts", "agreement_prompt_tokens", "agreement_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")


# The generation backends: TVM (compile-lm), PyTorch eager, llama.cpp (a GGUF file), LiteRT (the
# KV-cache step converted by litert-torch, float32).
GEN_BACKENDS = ("tvm", "torch", "llama.cpp", "litert")
# How a GGUF export stores its matrices (canao.lm.gguf.MATRIX_TYPES says what each means).
GGUF_PRECISIONS = ("teacher", "f32", "q8_0", "q4_0", "q4_0-q8_0-embd")


@dataclass(frozen=True)
class LMLatencyConfig:
    """The per-device decode latency models (ms per generated token, time to first token): decoder
    subnets compiled and timed generating on a local device."""

    seed: int = 0
    space: DecoderSpaceConfig = field(default_factory=DecoderSpaceConfig)
    samples: int = 12  # subnets compiled and timed (the largest and the smallest among them)
    holdout: int = 3  # of those, timed but not fitted on: the model's reported error is on these
    # "tvm" (compile-lm), "torch" (eager) and/or "llama.cpp" (GGUF export); the search uses the fastest
    backends: tuple[str, ...] = ("tvm",)
    compile: LMCompileConfig = field(default_factory=LMCompileConfig)  # max_context: the context the latency is for
    # tokens timed per measurement, after a prompt that fills the rest of the cache (the prompt
    # processed and the first token sampled: the time to first token)
    new_tokens: int = 16
    repeats: int = 3  # measurements per subnet and backend; the median is kept

    def __post_init__(self):
        check_samples(self.samples, self.holdout)
        bad = sorted(set(self.backends) - set(GEN_BACKENDS))
        if bad or not self.backends:
            raise ConfigError(f"backends: {bad or 'none'}: every backend must be one of {', '.join(GEN_BACKENDS)}")
        if not 2 <= self.new_tokens < self.compile.max_context:
            raise ConfigError(f"new_tokens: must be in [2, compile.max_context ({self.compile.max_context})), "
                              f"got {self.new_tokens}")
        if self.repeats < 1:
            raise ConfigError(f"repeats: must be >= 1, got {self.repeats}")


# The latencies search-lm can minimise (canao.lm.search.OBJECTIVES says how it prices each).
LM_OBJECTIVES = ("ms_per_token", "time_to_first_token")


@dataclass(frozen=True)
class LMSearchConfig:
    """Multi-objective search (NSGA-II) for generation: held-out perplexity with supernet weights vs
    a predicted latency: ms per generated token or time to first token (`objective`)."""

    seed: int = 0
    trials: int = 100  # subnets evaluated (the decoder space is small: 7 x 3 x 6 = 126 subnets by default)
    population_size: int = 16  # NSGA-II generation size
    # which latency the search minimises and budgets: "ms_per_token" (generating) or
    # "time_to_first_token" (the timed prompt processed and the first token), as latency-lm timed them
    objective: str = "ms_per_token"
    latency_budget_ms: float = 0.0  # the objective's predicted ms must not exceed this; 0 = no budget
    # ...nor the teacher's shape in llama.cpp (the peer to beat, its objective as latency-lm timed it
    # on this device) divided by this; 0 = none. The tighter one applies.
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
        if self.objective not in LM_OBJECTIVES:
            raise ConfigError(f"objective: {self.objective!r} is not one of {', '.join(LM_OBJECTIVES)}")
        check_min_speedup(self.min_speedup)
        _check_torch_device(self.torch_device)


@dataclass(frozen=True)
class LMDeployConfig:
    """The generation student's registry entry and the rule of which measured backend serves it."""

    model_name: str = "canao-generation"  # registry name: s3://<bucket>/models/<model_name>/<version>/, and MLflow's
    bucket: str = "canao"  # S3 bucket of the registry (endpoint and credentials come from the environment)
    alias: str = "production"  # MLflow Model Registry alias moved to the new version, if it passes the gate:
    max_perplexity: float = 0.0  # its held-out perplexity at most this (0: no ceiling), and no higher than the holder's
    max_ms_per_token: float = 0.0  # its ms per token on the device at most this (0: no ceiling)
    # The fastest measured backend serves, llama.cpp (the GGUF export) only where finalize-lm scored the
    # file within this relative perplexity of PyTorch: serving's own rule (ServeConfig.lm_perplexity_tol).
    perplexity_tol: float = ServeConfig.lm_perplexity_tol

    def __post_init__(self):
        for name in ("max_perplexity", "max_ms_per_token", "perplexity_tol"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
