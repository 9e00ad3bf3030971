"""The decoder search space: subnets of a Llama teacher as the compiler will see them.

A subnet keeps `num_layers` of the teacher's blocks, a number of key/value heads (each with
the query heads that share it) and one FFN width for every kept layer; the residual width
stays the teacher's. Which blocks: the space's `depth` rule, "influence" (the first and the
last, then those that change their input most on the corpus: `keep_order`) or "spread"
(evenly spaced); a subnet records the blocks it keeps where they are not the spread ones.
The allowed values follow canao.codesign.space's rules for the compiler (aligned widths, few
distinct values).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from canao.codesign.space import check_choices, check_kept_layers
from canao.config import ConfigError
from canao.lm.config import DecoderShape, DecoderSpaceConfig


def decoder_shape(llama_config) -> DecoderShape:
    """The shape of a transformers LlamaConfig (a teacher: every head hidden_size / num_heads wide)."""
    shape = DecoderShape(llama_config.num_hidden_layers, llama_config.hidden_size, llama_config.num_attention_heads,
                         llama_config.num_key_value_heads, llama_config.intermediate_size)
    head_dim = getattr(llama_config, "head_dim", None)
    if head_dim and head_dim != shape.hidden_size // shape.num_heads:
        raise ValueError(f"head_dim: {head_dim}, not hidden_size / num_attention_heads "
                         f"({shape.hidden_size // shape.num_heads}); such a decoder cannot be a supernet's teacher")
    return shape


def evenly_spaced(kept: int, total: int) -> list[int]:
    """Which `kept` of `total` teacher blocks a subnet keeps: evenly spaced, always the last (whose
    output the head reads), so the subnet spans the teacher's depth the way DynaBERT drops layers."""
    step = total / kept
    return [round((i + 1) * step) - 1 for i in range(kept)]


def keep_order(influence: list[float]) -> list[int]:
    """The teacher's blocks in the order a shallower subnet keeps them: the first (it turns
    embeddings into the residual stream every later block reads) and the last (whose output the
    head reads), then the others by `influence` (canao.lm.model.block_influence), largest first.
    A subnet of k blocks keeps the first k of this order, so a shallower one's blocks are a
    subset of a deeper one's (the supernet's weights are shared)."""
    last = len(influence) - 1
    middle = sorted(range(1, last), key=lambda i: -influence[i])
    return list(dict.fromkeys([0, last, *middle]))


@dataclass(frozen=True)
class DecoderSubnet:
    num_layers: int  # kept teacher blocks (see `layer_indices`)
    kv_heads: int  # key/value heads of every kept block, each with its query heads (the most important first)
    ffn_size: int  # FFN width of every kept block (the most important neurons first)
    layers: tuple[int, ...] = ()  # the teacher blocks kept, in order; () = `evenly_spaced`

    def __post_init__(self):
        check_kept_layers(self.layers, self.num_layers)

    def layer_indices(self, teacher_layers: int) -> list[int]:
        return list(self.layers) or evenly_spaced(self.num_layers, teacher_layers)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "kv_heads": self.kv_heads, "ffn_size": self.ffn_size} | (
            {"layers": list(self.layers)} if self.layers else {})

    @classmethod
    def from_dict(cls, data: dict, where: str = "subnet") -> DecoderSubnet:
        expected = {"num_layers", "kv_heads", "ffn_size"}
        if not isinstance(data, dict) or not expected <= set(data) <= expected | {"layers"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: expected keys {sorted(expected)} (and optionally 'layers'), got {got}")
        return cls(int(data["num_layers"]), int(data["kv_heads"]), int(data["ffn_size"]),
                   tuple(int(i) for i in data.get("layers", ())))

    def label(self) -> str:
        kept = f" blocks {','.join(map(str, self.layers))}" if self.layers else ""
        return f"L{self.num_layers}{kept} KV{self.kv_heads} FFN {self.ffn_size}"


class DecoderSpace:
    """The allowed decoder subnets of one teacher: validation, the extremes, random samples.
    `block_order`: `keep_order` of the teacher's blocks, which an "influence" space keeps; None
    where no subnet's blocks matter (the latency model: time depends on the depth only)."""

    def __init__(self, cfg: DecoderSpaceConfig, teacher: DecoderShape, block_order: list[int] | None = None):
        self.cfg, self.teacher = cfg, teacher
        self.block_order = block_order if cfg.depth == "influence" else None
        if self.block_order is not None and sorted(self.block_order) != list(range(teacher.num_layers)):
            raise ValueError(f"block_order: {block_order} is not an order of the teacher's "
                             f"{teacher.num_layers} blocks")
        for name, values, bound in (("layer_counts", cfg.layer_counts, teacher.num_layers),
                                    ("kv_head_counts", cfg.kv_head_counts, teacher.num_kv_heads),
                                    ("ffn_sizes", cfg.ffn_sizes, teacher.ffn_size)):
            check_choices(name, values, bound)
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

    def make(self, num_layers: int, kv_heads: int, ffn_size: int) -> DecoderSubnet:
        """The subnet of these choices, keeping the blocks the space's depth rule gives."""
        kept = ()
        if self.block_order is not None and num_layers < self.teacher.num_layers:
            kept = tuple(sorted(self.block_order[:num_layers]))
        return self.validate(DecoderSubnet(num_layers, kv_heads, ffn_size, kept))

    def largest(self) -> DecoderSubnet:
        c = self.cfg
        return self.make(max(c.layer_counts), max(c.kv_head_counts), max(c.ffn_sizes))

    def smallest(self) -> DecoderSubnet:
        c = self.cfg
        return self.make(min(c.layer_counts), min(c.kv_head_counts), min(c.ffn_sizes))

    def extremes(self) -> list[DecoderSubnet]:
        """The largest, the smallest, the deepest-thinnest and the shallowest-widest subnets (see
        canao.qa.space.SearchSpace.extremes: what a latency model must see besides random ones)."""
        c = self.cfg
        corners = [self.largest(), self.smallest(),
                   self.make(max(c.layer_counts), min(c.kv_head_counts), min(c.ffn_sizes)),
                   self.make(min(c.layer_counts), max(c.kv_head_counts), max(c.ffn_sizes))]
        return list(dict.fromkeys(corners))

    def sample(self, rng: random.Random) -> DecoderSubnet:
        c = self.cfg
        return self.make(rng.choice(c.layer_counts), rng.choice(c.kv_head_counts), rng.choice(c.ffn_sizes))


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


def prefill_work(subnet: DecoderSubnet, teacher: DecoderShape, prompt: int) -> dict[str, int]:
    """Work of processing a prompt of `prompt` tokens up to the first token's logits (the time to
    first token), by `decoder_work`'s kinds: the projections and FFN of every prompt token
    ("dense"), causal attention of each token over itself and those before it (prompt x
    (prompt + 1) / 2 pairs, "attention"), and the memory-bound rest ("elementwise": each token's
    keys and values written to the cache, softmax over its pairs, SwiGLU, norms, residual adds).
    The compiled steps take the prompt in padded chunks that each attend over (and rewrite) the
    whole static cache: at the one prompt length a latency model is fitted for, their dense and
    attention work is a fixed multiple of the work here, which each backend's fitted cost per
    unit takes up (the parts of the elementwise work weigh differently there). The output head
    is left out as in `decoder_work`."""
    e = teacher.hidden_size
    q, kv, head_size = decoder_widths(subnet, teacher)
    f, p, n = subnet.ffn_size, prompt, subnet.num_layers
    pairs = p * (p + 1) // 2
    return {"dense": n * p * 2 * (e * (q + 2 * kv) + q * e + 3 * e * f),
            "attention": n * 4 * pairs * q,
            "elementwise": n * (2 * p * kv + pairs * q // head_size + p * (3 * f + 4 * e))}


def decoder_params(subnet: DecoderSubnet, teacher: DecoderShape, vocab_size: int, tied_head: bool) -> int:
    """Parameters of the extracted decoder (embeddings, and the output head unless tied)."""
    e = teacher.hidden_size
    q, kv, _ = decoder_widths(subnet, teacher)
    per_layer = e * (q + 2 * kv) + q * e + 3 * e * subnet.ffn_size + 2 * e  # attention, gated FFN, two RMSNorms
    return vocab_size * e * (1 if tied_head else 2) + subnet.num_layers * per_layer + e
