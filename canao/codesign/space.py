"""What every family's search space shares: the checks of a dimension's allowed values and of
a subnet's kept teacher layers.

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

from canao.config import ConfigError


def check_choices(name: str, values, bound: int) -> None:
    """A dimension's allowed values: not empty, within [1, the teacher's], the teacher's among them."""
    if not values:
        raise ConfigError(f"space.{name}: must not be empty")
    if min(values) < 1 or max(values) > bound:
        raise ConfigError(f"space.{name}: values must be in [1, {bound}] (the teacher's), got {list(values)}")
    if max(values) != bound:
        raise ConfigError(f"space.{name}: must include the teacher's {bound} (the largest subnet is the "
                          f"teacher), got {list(values)}")


def check_kept_layers(layers: tuple[int, ...], num_layers: int) -> None:
    """A subnet's explicit kept teacher layers (() = its space's rule): `num_layers` distinct
    indices in increasing order."""
    if layers and (len(layers) != num_layers or list(layers) != sorted(set(layers)) or layers[0] < 0):
        raise ValueError(f"subnet.layers: {list(layers)} must be {num_layers} distinct teacher layer indices in "
                         "increasing order")
