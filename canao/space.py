"""The search spaces: BERT subnets and decoder subnets of a teacher, as the compiler will see them.

A subnet keeps `num_layers` of the teacher's blocks (evenly spaced, so it spans the
teacher's depth the way DynaBERT drops layers), a residual width `hidden_size`, and per
kept layer a number of attention heads and an FFN width. Heads keep the teacher's head
size, so a layer's attention width is `heads * head_size`; it cannot exceed `hidden_size`
(the extracted model is a plain BERT whose head count is bounded by hidden / head size).

The allowed values are chosen for the compiler, not only for accuracy:
- widths (hidden and FFN) are multiples of `align` (64 for MiniLM): every matmul dimension
  then splits into whole 16-lane AVX-512 / 4-lane NEON vectors and into the tile sizes
  MetaSchedule picks, so no kernel pays for a ragged edge;
- few distinct values: every new matmul shape is a new kernel to tune (10-25 s per kernel
  per tuning round on 2 cores), and the per-device tuning database only pays off when many
  subnets share shapes; coarse steps (FFN in steps of 256, heads in steps of 2, so an
  attention width is a multiple of 64 too) keep the set of kernels small.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from canao.config import ConfigError, DecoderShape, DecoderSpaceConfig, SpaceConfig


def evenly_spaced(kept: int, total: int) -> list[int]:
    """Which `kept` of `total` teacher blocks a subnet keeps: evenly spaced, always the last (whose
    output the head reads), so the subnet spans the teacher's depth the way DynaBERT drops layers."""
    step = total / kept
    return [round((i + 1) * step) - 1 for i in range(kept)]


@dataclass(frozen=True)
class TeacherShape:
    num_layers: int  # transformer blocks of the teacher
    hidden_size: int  # residual width
    num_heads: int  # attention heads per layer
    ffn_size: int  # FFN width per layer

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def of(cls, bert_config) -> TeacherShape:
        """The shape of a transformers BertConfig."""
        return cls(bert_config.num_hidden_layers, bert_config.hidden_size, bert_config.num_attention_heads,
                   bert_config.intermediate_size)


@dataclass(frozen=True)
class SubnetConfig:
    num_layers: int  # kept teacher blocks (see `layer_indices`)
    hidden_size: int  # residual width: the first `hidden_size` channels of the (importance-ordered) teacher
    heads: tuple[int, ...]  # attention heads of each kept block (the most important first)
    ffn_sizes: tuple[int, ...]  # FFN width of each kept block (the most important neurons first)

    def layer_indices(self, teacher_layers: int) -> list[int]:
        return evenly_spaced(self.num_layers, teacher_layers)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "heads": list(self.heads), "ffn_sizes": list(self.ffn_sizes)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "subnet") -> SubnetConfig:
        expected = {"num_layers", "hidden_size", "heads", "ffn_sizes"}
        if not isinstance(data, dict) or set(data) != expected:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: expected keys {sorted(expected)}, got {got}")
        return cls(int(data["num_layers"]), int(data["hidden_size"]), tuple(int(h) for h in data["heads"]),
                   tuple(int(f) for f in data["ffn_sizes"]))

    def label(self) -> str:
        return (f"L{self.num_layers} H{self.hidden_size} heads {'/'.join(map(str, self.heads))} "
                f"FFN {'/'.join(map(str, self.ffn_sizes))}")


def _check_choices(name: str, values, bound: int) -> None:
    """A dimension's allowed values: not empty, within [1, the teacher's], the teacher's among them."""
    if not values:
        raise ConfigError(f"space.{name}: must not be empty")
    if min(values) < 1 or max(values) > bound:
        raise ConfigError(f"space.{name}: values must be in [1, {bound}] (the teacher's), got {list(values)}")
    if max(values) != bound:
        raise ConfigError(f"space.{name}: must include the teacher's {bound} (the largest subnet is the "
                          f"teacher), got {list(values)}")


class SearchSpace:
    """The allowed subnets of one teacher: validation, the extremes, random samples."""

    def __init__(self, cfg: SpaceConfig, teacher: TeacherShape):
        self.cfg, self.teacher = cfg, teacher
        t = teacher
        for name, values, bound in (("layer_counts", cfg.layer_counts, t.num_layers),
                                    ("hidden_sizes", cfg.hidden_sizes, t.hidden_size),
                                    ("head_counts", cfg.head_counts, t.num_heads),
                                    ("ffn_sizes", cfg.ffn_sizes, t.ffn_size)):
            _check_choices(name, values, bound)
        for name, values in (("hidden_sizes", cfg.hidden_sizes), ("ffn_sizes", cfg.ffn_sizes)):
            ragged = [v for v in values if v % cfg.align]
            if ragged:
                raise ConfigError(f"space.{name}: {ragged} not multiples of space.align ({cfg.align})")
        bad = [h for h in cfg.hidden_sizes if h % t.head_size or h // t.head_size < min(cfg.head_counts)]
        if bad:
            raise ConfigError(f"space.hidden_sizes: {bad} must be multiples of the head size {t.head_size} "
                              f"with room for {min(cfg.head_counts)} heads")

    def max_heads(self, hidden_size: int) -> int:
        return min(self.teacher.num_heads, hidden_size // self.teacher.head_size)

    def validate(self, subnet: SubnetConfig) -> SubnetConfig:
        """`subnet` if it is in the space, else a ValueError naming the offending field."""
        c = self.cfg
        if subnet.num_layers not in c.layer_counts:
            raise ValueError(f"subnet.num_layers: {subnet.num_layers} not in {list(c.layer_counts)}")
        if subnet.hidden_size not in c.hidden_sizes:
            raise ValueError(f"subnet.hidden_size: {subnet.hidden_size} not in {list(c.hidden_sizes)}")
        for name in ("heads", "ffn_sizes"):
            if len(getattr(subnet, name)) != subnet.num_layers:
                raise ValueError(f"subnet.{name}: {len(getattr(subnet, name))} values for "
                                 f"{subnet.num_layers} layers")
        limit = self.max_heads(subnet.hidden_size)
        for i, (h, f) in enumerate(zip(subnet.heads, subnet.ffn_sizes, strict=True)):
            if h not in c.head_counts or h > limit:
                raise ValueError(f"subnet.heads[{i}]: {h} not in {[x for x in c.head_counts if x <= limit]} "
                                 f"(hidden {subnet.hidden_size} holds at most {limit} heads)")
            if f not in c.ffn_sizes:
                raise ValueError(f"subnet.ffn_sizes[{i}]: {f} not in {list(c.ffn_sizes)}")
        return subnet

    def make(self, num_layers: int, hidden_size: int, heads: list[int], ffn_sizes: list[int]) -> SubnetConfig:
        """A subnet from per-layer choices of the largest depth; heads are capped by the hidden
        size, choices past `num_layers` are ignored (a fixed set of variables for the search)."""
        limit = self.max_heads(hidden_size)
        allowed = [h for h in self.cfg.head_counts if h <= limit]
        capped = [h if h <= limit else max(allowed) for h in heads[:num_layers]]
        return self.validate(SubnetConfig(num_layers, hidden_size, tuple(capped), tuple(ffn_sizes[:num_layers])))

    def largest(self) -> SubnetConfig:
        c = self.cfg
        n = max(c.layer_counts)
        return self.make(n, max(c.hidden_sizes), [max(c.head_counts)] * n, [max(c.ffn_sizes)] * n)

    def smallest(self) -> SubnetConfig:
        c = self.cfg
        n = min(c.layer_counts)
        hidden = min(c.hidden_sizes)
        return self.make(n, hidden, [min(c.head_counts)] * n, [min(c.ffn_sizes)] * n)

    def sample(self, rng: random.Random) -> SubnetConfig:
        c = self.cfg
        n, hidden = rng.choice(c.layer_counts), rng.choice(c.hidden_sizes)
        allowed = [h for h in c.head_counts if h <= self.max_heads(hidden)]
        heads = [rng.choice(allowed) for _ in range(n)]
        return self.make(n, hidden, heads, [rng.choice(c.ffn_sizes) for _ in range(n)])


def params(subnet: SubnetConfig, teacher: TeacherShape, vocab_size: int, max_positions: int) -> int:
    """Parameters of the extracted QA model (embeddings included)."""
    h, d = subnet.hidden_size, teacher.head_size
    total = (vocab_size + max_positions + 2) * h + 2 * h  # embeddings + their LayerNorm
    for a, f in zip(subnet.heads, subnet.ffn_sizes, strict=True):
        w = a * d
        total += 3 * (h * w + w) + (w * h + h) + 2 * h  # q, k, v, attention output, LayerNorm
        total += (h * f + f) + (f * h + h) + 2 * h  # FFN in, out, LayerNorm
    return total + 2 * h + 2  # span head


def flops(subnet: SubnetConfig, teacher: TeacherShape, seq_len: int) -> int:
    """Multiply-adds x 2 of one forward pass at `seq_len` tokens (matmuls only): the proxy that
    a compiler-unaware search would use."""
    h, d, s = subnet.hidden_size, teacher.head_size, seq_len
    total = 0
    for a, f in zip(subnet.heads, subnet.ffn_sizes, strict=True):
        w = a * d
        total += 2 * s * h * w * 4  # q, k, v, output projections
        total += 2 * 2 * s * s * w  # scores and weighted sum
        total += 2 * 2 * s * h * f  # FFN
    return total + 2 * s * h * 2


def decoder_shape(llama_config) -> DecoderShape:
    """The shape of a transformers LlamaConfig (a teacher: every head hidden_size / num_heads wide)."""
    shape = DecoderShape(llama_config.num_hidden_layers, llama_config.hidden_size, llama_config.num_attention_heads,
                         llama_config.num_key_value_heads, llama_config.intermediate_size)
    head_dim = getattr(llama_config, "head_dim", None)
    if head_dim and head_dim != shape.hidden_size // shape.num_heads:
        raise ValueError(f"head_dim: {head_dim}, not hidden_size / num_attention_heads "
                         f"({shape.hidden_size // shape.num_heads}); such a decoder cannot be a supernet's teacher")
    return shape


@dataclass(frozen=True)
class DecoderSubnet:
    num_layers: int  # kept teacher blocks (see `layer_indices`)
    kv_heads: int  # key/value heads of every kept block, each with its query heads (the most important first)
    ffn_size: int  # FFN width of every kept block (the most important neurons first)

    def layer_indices(self, teacher_layers: int) -> list[int]:
        return evenly_spaced(self.num_layers, teacher_layers)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "kv_heads": self.kv_heads, "ffn_size": self.ffn_size}

    @classmethod
    def from_dict(cls, data: dict, where: str = "subnet") -> DecoderSubnet:
        expected = {"num_layers", "kv_heads", "ffn_size"}
        if not isinstance(data, dict) or set(data) != expected:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: expected keys {sorted(expected)}, got {got}")
        return cls(int(data["num_layers"]), int(data["kv_heads"]), int(data["ffn_size"]))

    def label(self) -> str:
        return f"L{self.num_layers} KV{self.kv_heads} FFN {self.ffn_size}"


class DecoderSpace:
    """The allowed decoder subnets of one teacher: validation, the extremes, random samples."""

    def __init__(self, cfg: DecoderSpaceConfig, teacher: DecoderShape):
        self.cfg, self.teacher = cfg, teacher
        for name, values, bound in (("layer_counts", cfg.layer_counts, teacher.num_layers),
                                    ("kv_head_counts", cfg.kv_head_counts, teacher.num_kv_heads),
                                    ("ffn_sizes", cfg.ffn_sizes, teacher.ffn_size)):
            _check_choices(name, values, bound)
        ragged = [v for v in cfg.ffn_sizes if v % cfg.align]
        if ragged:
            raise ConfigError(f"space.ffn_sizes: {ragged} not multiples of space.align ({cfg.align})")
        head_size = teacher.hidden_size // teacher.num_heads
        if head_size % cfg.align:
            raise ConfigError(f"space.align: {cfg.align} does not divide the head size {head_size}, so key/value "
                              f"widths (kv_heads x {head_size}) would be ragged")

    def validate(self, subnet: DecoderSubnet) -> DecoderSubnet:
        """`subnet` if it is in the space, else a ValueError naming the offending field."""
        for name, allowed in (("num_layers", self.cfg.layer_counts), ("kv_heads", self.cfg.kv_head_counts),
                              ("ffn_size", self.cfg.ffn_sizes)):
            if getattr(subnet, name) not in allowed:
                raise ValueError(f"subnet.{name}: {getattr(subnet, name)} not in {list(allowed)}")
        return subnet

    def largest(self) -> DecoderSubnet:
        c = self.cfg
        return self.validate(DecoderSubnet(max(c.layer_counts), max(c.kv_head_counts), max(c.ffn_sizes)))

    def smallest(self) -> DecoderSubnet:
        c = self.cfg
        return self.validate(DecoderSubnet(min(c.layer_counts), min(c.kv_head_counts), min(c.ffn_sizes)))

    def sample(self, rng: random.Random) -> DecoderSubnet:
        c = self.cfg
        return DecoderSubnet(rng.choice(c.layer_counts), rng.choice(c.kv_head_counts), rng.choice(c.ffn_sizes))


def decoder_widths(subnet: DecoderSubnet, teacher: DecoderShape) -> tuple[int, int, int]:
    """(query width, key/value width, head size) of each block of the subnet."""
    head_size = teacher.hidden_size // teacher.num_heads
    kv = subnet.kv_heads * head_size
    return kv * (teacher.num_heads // teacher.num_kv_heads), kv, head_size


def decoder_work(subnet: DecoderSubnet, teacher: DecoderShape, context: int) -> dict[str, int]:
    """Work of one decode step (one new token) of the subnet's compiled step over a KV cache of
    `context` positions, by kind: multiply-adds x 2 of the projections and FFN ("dense") and of
    attention over the cache ("attention"), and elements of the memory-bound rest
    ("elementwise": the cache rewrite, softmax, SwiGLU, norms, residual adds). The step attends
    over and rewrites the whole static cache however full it is. The output head is the same
    for every subnet and is left out."""
    e = teacher.hidden_size
    q, kv, head_size = decoder_widths(subnet, teacher)
    f, c, n = subnet.ffn_size, context, subnet.num_layers
    return {"dense": n * 2 * (e * (q + 2 * kv) + q * e + 3 * e * f),
            "attention": n * 4 * c * q,
            "elementwise": n * (4 * c * kv + c * q // head_size + 3 * f + 4 * e)}


def decoder_flops(subnet: DecoderSubnet, teacher: DecoderShape, context: int) -> int:
    """Matmul FLOPs of one decode step: the proxy that a compiler-unaware search would use."""
    work = decoder_work(subnet, teacher, context)
    return work["dense"] + work["attention"]


def decoder_params(subnet: DecoderSubnet, teacher: DecoderShape, vocab_size: int, tied_head: bool) -> int:
    """Parameters of the extracted decoder (embeddings, and the output head unless tied)."""
    e = teacher.hidden_size
    q, kv, _ = decoder_widths(subnet, teacher)
    per_layer = e * (q + 2 * kv) + q * e + 3 * e * subnet.ffn_size + 2 * e  # attention, gated FFN, two RMSNorms
    return vocab_size * e * (1 if tied_head else 2) + subnet.num_layers * per_layer + e
