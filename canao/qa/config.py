"""The configs of the QA family's stages: the BERT teacher, its SQuAD data and windows, the
elastic supernet and its space, the latency model, the search, finalize, compile and bench.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from canao.config import REUSE_OTHER_HARDWARE, ConfigError, KDConfig, TrainConfig, check_min_speedup, check_samples


@dataclass(frozen=True)
class BertShape:
    """A BERT's shape: a random model's in a config, a teacher's in a search space and latency model."""

    num_layers: int = 2  # transformer blocks
    hidden_size: int = 64  # width of the residual stream
    num_heads: int = 2  # attention heads per layer (hidden_size % num_heads == 0)
    ffn_size: int = 128  # intermediate width of each feed-forward block

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def of(cls, bert_config) -> BertShape:
        """The shape of a transformers BertConfig."""
        return cls(bert_config.num_hidden_layers, bert_config.hidden_size, bert_config.num_attention_heads,
                   bert_config.intermediate_size)


@dataclass(frozen=True)
class QAKDConfig(KDConfig):
    """A standalone student's KD (finalize, bench-students): KDConfig's terms, and MiniLMv2's
    self-attention relations (Wang et al. 2021), which need no equal head counts or widths."""

    # weight of the relation KD: the query-query, key-key and value-value relations of the student's
    # last layer against the teacher's last layer (KL over each token's relations); 0 = off
    attention_weight: float = 0.0
    # relation heads the queries, keys and values split into; must divide every attention width
    # (a layer of h heads is h * head_size wide: 2 heads of 32 -> 64 -> 1, 2, 4, ... 64)
    relation_heads: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.attention_weight < 0 or self.relation_heads < 1:
            raise ConfigError(f"kd.attention_weight: must be >= 0, kd.relation_heads: >= 1; got "
                              f"{self.attention_weight}, {self.relation_heads}")


@dataclass(frozen=True)
class SquadDataConfig:
    train_file: str = "../shared/data/squad/train-subset-v1.1.json"  # fine-tuning questions
    eval_file: str = "../shared/data/squad/dev-a-v1.1.json"  # evaluation only, never trained on
    train_questions: int = 0  # first N training questions in file order; 0 = all
    eval_questions: int = 0  # first N evaluation questions in file order; 0 = all


@dataclass(frozen=True)
class AugmentConfig:
    """New inputs for the teacher to label, made from the training questions (canao.qa.augment)."""

    crop: int = 0  # copies of each question whose context is cut to other whole sentences around its answer
    repair: int = 0  # copies of each question paired with another paragraph of its article (no answer there)
    replace: int = 0  # copies of each question with words of its context outside the answer replaced
    replace_rate: float = 0.15  # share of the context's words a `replace` copy swaps for words of its article
    seed: int = 0

    def __post_init__(self):
        for name in ("crop", "repair", "replace"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 < self.replace_rate <= 1:
            raise ConfigError(f"augment.replace_rate: must be in (0, 1], got {self.replace_rate}")

    @property
    def copies(self) -> int:
        """New questions made from each training question."""
        return self.crop + self.repair + self.replace


@dataclass(frozen=True)
class SquadFeatureConfig:
    max_seq_len: int = 384  # tokens per window: [CLS] question [SEP] context-slice [SEP]
    doc_stride: int = 128  # tokens shared by consecutive windows of a long context
    n_best: int = 20  # start and end candidates kept per window in post-processing
    max_answer_len: int = 30  # longest answer span, in tokens


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
    reuse_other_hardware: bool = REUSE_OTHER_HARDWARE  # see REUSE_OTHER_HARDWARE


@dataclass(frozen=True)
class BenchConfig:
    warmup: int = 10  # untimed runs before timing (caches, thread pools, lazy allocation)
    runs: int = 50  # timed runs; p50/p90/min are over these
    seq_lens: tuple[int, ...] = (128, 384)  # `make bench`: sequence lengths of the suite
    devices: tuple[str, ...] = ("x86-1t", "x86-2t")  # `make bench`: device keys of the suite


@dataclass(frozen=True)
class SpaceConfig:
    """Allowed subnet values (canao/codesign/space.py says why these: shapes the compiler handles well)."""

    layer_counts: tuple[int, ...] = (2, 3, 4, 5, 6)  # kept teacher blocks (canao.qa.space says which)
    hidden_sizes: tuple[int, ...] = (128, 192, 256, 320, 384)  # residual widths
    head_counts: tuple[int, ...] = (2, 4, 6, 8, 10, 12)  # attention heads per layer (head size stays the teacher's)
    ffn_sizes: tuple[int, ...] = (256, 512, 768, 1024, 1280, 1536)  # FFN widths per layer
    align: int = 64  # every hidden and FFN width must be a multiple of this (vector and tile sizes)


@dataclass(frozen=True)
class DistillConfig:
    """pretraining-distill: the elastic supernet trained from the teacher."""

    seed: int = 42
    space: SpaceConfig = field(default_factory=SpaceConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    random_subnets: int = 2  # random subnets per step, besides the largest and the smallest (sandwich rule)
    importance_batches: int = 16  # training batches that rank heads and neurons before distilling
    data: SquadDataConfig = field(default_factory=SquadDataConfig)  # train_questions: first N train questions
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # teacher-labelled inputs beyond the questions
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
        check_samples(self.samples, self.holdout)
        bad = sorted(set(self.backends) - {"tvm", *self.compile.peers})
        if bad or not self.backends:
            raise ConfigError(f"backends: {bad or 'none'}: every backend must be tvm or one of compile.peers "
                              f"({', '.join(self.compile.peers)})")


@dataclass(frozen=True)
class FinalistConfig:
    """The second look at each budget's best front points (canao.codesign.pareto.rerank): each is
    extracted from the supernet, distilled briefly from the supernet's largest subnet (the
    distill stage's KD and train settings otherwise), and scored on the held-out slice; the
    budget ships the best by that F1. The supernet's own F1 misranks the smallest students."""

    count: int = 0  # per budget: the most accurate front points within it distilled; 0 = the supernet's F1 alone
    questions: int = 3000  # the first N of the supernet's training questions each finalist learns from
    epochs: float = 1.0  # passes over those questions' windows
    learning_rate: float = 1e-4  # peak AdamW learning rate (warm-up and decay as the distill stage's)

    def __post_init__(self):
        if self.count < 0 or self.questions < 1 or not self.epochs > 0 or not self.learning_rate > 0:
            raise ConfigError(f"finalists: count must be >= 0, questions >= 1, epochs and learning_rate > 0; "
                              f"got count={self.count}, questions={self.questions}, epochs={self.epochs}, "
                              f"learning_rate={self.learning_rate}")


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
    # Looser budgets, as speed-ups over the same peer, at which finalize also trains the front's best
    # point (and a uniform baseline) beside the deployed one; the search covers the loosest.
    front_speedups: tuple[float, ...] = ()
    params_budget: int = 0  # parameters must not exceed this; 0 = no budget
    val_questions: int = 500  # the LAST N training questions: held out of distillation, scored each trial
    eval_batch_size: int = 64  # windows per forward pass
    remeasure: int = 8  # front points compiled and measured on the device (highest F1 first)
    # processes each of them is timed in, its ms their median (canao.qa.bench.timed_in_turn: why)
    remeasure_rounds: int = 1
    # Each of them (and each baseline candidate) timed in turn with the teacher's shape on LiteRT fp32
    # and its ms given in the latency stage's frame (canao.qa.bench.in_frame_of): the budget, made from
    # the latency stage's timing of the teacher, then judges the ratio, not the machine's speed that hour.
    timed_with_teacher: bool = False
    # Hill-climbing after NSGA-II (canao.codesign.pareto.Climb): from each budget's most accurate
    # subnet, its one-step-larger neighbours (canao.qa.space.SearchSpace.larger_neighbours) priced
    # within the budget, at most `climb_per_round` a budget a round, `climb_trials` in all; 0 = none.
    climb_trials: int = 0
    climb_per_round: int = 4
    finalists: FinalistConfig = field(default_factory=FinalistConfig)  # re-ranking by short KD
    # The uniform baseline held to each budget as measured, as the student is: the largest uniform
    # subnets priced within the budget plus `baseline_slack` are measured in turn (at most
    # `baseline_tries`) and the first that fits is the baseline; 0 tries: the largest priced within.
    baseline_tries: int = 0
    baseline_slack: float = 0.25
    reuse_other_hardware: bool = REUSE_OTHER_HARDWARE  # see REUSE_OTHER_HARDWARE (here: the latency model)

    def __post_init__(self):
        if self.trials < 1 or self.population_size < 2 or self.val_questions < 1 or self.remeasure_rounds < 1:
            raise ConfigError("trials, val_questions, remeasure_rounds: must be >= 1; population_size: >= 2")
        if self.climb_trials < 0 or self.climb_per_round < 1:
            raise ConfigError(f"climb_trials: must be >= 0, climb_per_round: >= 1; got {self.climb_trials}, "
                              f"{self.climb_per_round}")
        if self.baseline_tries < 0 or not self.baseline_slack >= 0:  # also refuses NaN
            raise ConfigError(f"baseline_tries, baseline_slack: must be >= 0, got {self.baseline_tries}, "
                              f"{self.baseline_slack}")
        check_min_speedup(self.min_speedup)
        if not all(s > 0 for s in self.front_speedups):  # also refuses NaN
            raise ConfigError(f"front_speedups: every speed-up must be > 0, got {list(self.front_speedups)}")


@dataclass(frozen=True)
class FinalizeConfig:
    """The chosen front point: extracted, fine-tuned by distillation, scored, compiled, benchmarked."""

    seed: int = 42
    kd: QAKDConfig = field(default_factory=QAKDConfig)
    data: SquadDataConfig = field(default_factory=SquadDataConfig)  # fine-tune and evaluation questions
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # teacher-labelled inputs beyond the questions
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: bool = True  # compile the student for the search's device and time it against the peers
    bench_backends: tuple[str, ...] = ("tvm", "litert")  # backends timed for the student and the teacher
    # rounds timing the teacher and every model in turn, each in a process of its own: ms are the
    # medians, a speed-up the median of the rounds' ratios (canao.qa.bench.timed_in_turn: why)
    timing_rounds: int = 1
    baseline: bool = True  # finalize the search's uniform baseline beside the student, alike (twice the work)
    # epochs of the deployed (tightest) budget's student and its baseline; 0 = train.epochs. The
    # smallest students lose the most to distillation cut short and cost the least a step.
    deployed_epochs: float = 0.0

    def __post_init__(self):
        if self.deployed_epochs < 0:
            raise ConfigError(f"deployed_epochs: must be >= 0 (0 = train.epochs), got {self.deployed_epochs}")
        if self.timing_rounds < 1:
            raise ConfigError(f"timing_rounds: must be >= 1, got {self.timing_rounds}")

    def train_of(self, deployed: bool) -> TrainConfig:
        """The training settings of a deployed-budget model, or of a looser budget's."""
        if deployed and self.deployed_epochs:
            return dataclasses.replace(self.train, epochs=self.deployed_epochs)
        return self.train
