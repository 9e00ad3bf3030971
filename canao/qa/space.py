"""The BERT-QA search space: subnets of a BERT teacher as the compiler will see them.

A subnet keeps `num_layers` of the teacher's blocks (`first_layers_spread`: layer 0 and every
(total/kept)-th after it, the top block dropped first; chosen by measurement, BENCHMARKS.md's
"Which students": with the same widths, 3 of 6 blocks kept as 0,2,4 distilled to F1 39.8 where
1,3,5 (evenly spaced, the top kept) reached 21.0 and 0,2,5 12.9), a residual width `hidden_size`, and per
kept layer a number of attention heads and an FFN width. Heads keep the teacher's head
size, so a layer's attention width is `heads * head_size`; it cannot exceed `hidden_size`
(the extracted model is a plain BERT whose head count is bounded by hidden / head size).
The allowed values follow canao.codesign.space's rules for the compiler.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass

from canao.codesign.space import check_choices, check_kept_layers
from canao.config import ConfigError
from canao.qa.config import BertShape, SpaceConfig


@dataclass(frozen=True)
class SubnetConfig:
    num_layers: int  # kept teacher blocks (see `layer_indices`)
    hidden_size: int  # residual width: the first `hidden_size` channels of the (importance-ordered) teacher
    heads: tuple[int, ...]  # attention heads of each kept block (the most important first)
    ffn_sizes: tuple[int, ...]  # FFN width of each kept block (the most important neurons first)
    layers: tuple[int, ...] = ()  # the teacher blocks kept, in order; () = `first_layers_spread`

    def __post_init__(self):
        check_kept_layers(self.layers, self.num_layers)

    def layer_indices(self, teacher_layers: int) -> list[int]:
        return list(self.layers) or first_layers_spread(self.num_layers, teacher_layers)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "heads": list(self.heads), "ffn_sizes": list(self.ffn_sizes)} | (
            {"layers": list(self.layers)} if self.layers else {})

    @classmethod
    def from_dict(cls, data: dict, where: str = "subnet") -> SubnetConfig:
        expected = {"num_layers", "hidden_size", "heads", "ffn_sizes"}
        if not isinstance(data, dict) or not expected <= set(data) <= expected | {"layers"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: expected keys {sorted(expected)} (and optionally 'layers'), got {got}")
        return cls(int(data["num_layers"]), int(data["hidden_size"]), tuple(int(h) for h in data["heads"]),
                   tuple(int(f) for f in data["ffn_sizes"]), tuple(int(i) for i in data.get("layers", ())))

    def label(self) -> str:
        kept = f" layers {','.join(map(str, self.layers))}" if self.layers else ""
        return (f"L{self.num_layers}{kept} H{self.hidden_size} heads {'/'.join(map(str, self.heads))} "
                f"FFN {'/'.join(map(str, self.ffn_sizes))}")


class SearchSpace:
    """The allowed subnets of one teacher: validation, the extremes, random samples."""

    def __init__(self, cfg: SpaceConfig, teacher: BertShape):
        self.cfg, self.teacher = cfg, teacher
        t = teacher
        for name, values, bound in (("layer_counts", cfg.layer_counts, t.num_layers),
                                    ("hidden_sizes", cfg.hidden_sizes, t.hidden_size),
                                    ("head_counts", cfg.head_counts, t.num_heads),
                                    ("ffn_sizes", cfg.ffn_sizes, t.ffn_size)):
            check_choices(name, values, bound)
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
        if subnet.layers and subnet.layers[-1] >= self.teacher.num_layers:
            raise ValueError(f"subnet.layers: {list(subnet.layers)} past the teacher's {self.teacher.num_layers}")
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

    def extremes(self) -> list[SubnetConfig]:
        """The largest, the smallest, the deepest-thinnest and the shallowest-widest subnets: a
        latency model fitted on random subnets alone, which average out per layer, mispriced the
        deep, thin ones (the 2026-12-06 full run: 6 blocks of 2 heads predicted 7.72 ms on LiteRT
        int8, measured 10.20)."""
        c = self.cfg
        deep, shallow, hidden = max(c.layer_counts), min(c.layer_counts), max(c.hidden_sizes)
        corners = [self.largest(), self.smallest(),
                   self.make(deep, hidden, [min(c.head_counts)] * deep, [min(c.ffn_sizes)] * deep),
                   self.make(shallow, hidden, [max(c.head_counts)] * shallow, [max(c.ffn_sizes)] * shallow)]
        return list(dict.fromkeys(corners))

    def larger_neighbours(self, subnet: SubnetConfig) -> list[SubnetConfig]:
        """`subnet` with one layer's heads or FFN width one choice larger, then with every layer's:
        the steps of the search's climb (canao.codesign.pareto.Climb). Depth, width and kept layers
        stay; a layer already at its largest choice has no step."""
        heads = [h for h in self.cfg.head_counts if h <= self.max_heads(subnet.hidden_size)]
        choices = {"heads": sorted(heads), "ffn_sizes": sorted(self.cfg.ffn_sizes)}

        def larger(field: str, value: int) -> int | None:
            bigger = [c for c in choices[field] if c > value]
            return bigger[0] if bigger else None

        steps = []
        for field in ("heads", "ffn_sizes"):
            values = getattr(subnet, field)
            for i, value in enumerate(values):
                if (up := larger(field, value)) is not None:
                    steps.append(dataclasses.replace(subnet, **{field: values[:i] + (up,) + values[i + 1:]}))
            every = tuple(larger(field, v) or v for v in values)
            if sum(u != v for u, v in zip(every, values, strict=True)) > 1:  # else a one-layer step above
                steps.append(dataclasses.replace(subnet, **{field: every}))
        return [self.validate(s) for s in steps]

    def sample(self, rng: random.Random) -> SubnetConfig:
        c = self.cfg
        n, hidden = rng.choice(c.layer_counts), rng.choice(c.hidden_sizes)
        allowed = [h for h in c.head_counts if h <= self.max_heads(hidden)]
        heads = [rng.choice(allowed) for _ in range(n)]
        return self.make(n, hidden, heads, [rng.choice(c.ffn_sizes) for _ in range(n)])


def first_layers_spread(kept: int, total: int) -> list[int]:
    """Every (total/kept)-th teacher block from the first (DistilBERT's every other layer): the
    blocks a user keeps by hand, and the QA space's choice, layer 0 always among them."""
    return [i * total // kept for i in range(kept)]


def uniform_baseline(space: SearchSpace, predicted_ms: Callable[[SubnetConfig], float],
                     budget_ms: float) -> SubnetConfig:
    """The student a user builds without a search: teacher layers kept by `first_layers_spread`,
    every kept layer pruned alike (the same heads and FFN width, the most important units kept),
    the largest such subnet (in parameters) whose `predicted_ms` is within `budget_ms`; the
    fastest one when none is (its predicted latency then shows it over the budget)."""
    uniform = uniform_subnets(space)
    fitting = [s for s in uniform if predicted_ms(s) <= budget_ms]
    return fitting[0] if fitting else min(uniform, key=predicted_ms)


def uniform_per_depth(space: SearchSpace, predicted_ms: Callable[[SubnetConfig], float],
                      budget_ms: float) -> list[SubnetConfig]:
    """Each depth's largest uniform subnet (`uniform_subnets`) whose `predicted_ms` is within
    `budget_ms`, deepest first; a depth with none is left out."""
    fitting: dict[int, SubnetConfig] = {}
    for subnet in uniform_subnets(space):
        if subnet.num_layers not in fitting and predicted_ms(subnet) <= budget_ms:
            fitting[subnet.num_layers] = subnet
    return [fitting[depth] for depth in sorted(fitting, reverse=True)]


def uniform_subnets(space: SearchSpace) -> list[SubnetConfig]:
    """Every subnet a user builds without a search (`uniform_baseline`), largest first (in
    parameters, then depth)."""
    c, t = space.cfg, space.teacher
    uniform = [space.validate(SubnetConfig(layers, hidden, (heads,) * layers, (ffn,) * layers,
                                           tuple(first_layers_spread(layers, t.num_layers))))
               for layers in c.layer_counts for hidden in c.hidden_sizes
               for heads in c.head_counts if heads <= space.max_heads(hidden) for ffn in c.ffn_sizes]
    return sorted(uniform, key=lambda s: (params(s, t, 0, 0), s.num_layers), reverse=True)


def params(subnet: SubnetConfig, teacher: BertShape, vocab_size: int, max_positions: int) -> int:
    """Parameters of the extracted QA model (embeddings included)."""
    h, d = subnet.hidden_size, teacher.head_size
    total = (vocab_size + max_positions + 2) * h + 2 * h  # embeddings + their LayerNorm
    for a, f in zip(subnet.heads, subnet.ffn_sizes, strict=True):
        w = a * d
        total += 3 * (h * w + w) + (w * h + h) + 2 * h  # q, k, v, attention output, LayerNorm
        total += (h * f + f) + (f * h + h) + 2 * h  # FFN in, out, LayerNorm
    return total + 2 * h + 2  # span head


def flops(subnet: SubnetConfig, teacher: BertShape, seq_len: int) -> int:
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
