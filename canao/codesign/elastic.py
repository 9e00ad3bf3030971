"""What every elastic supernet shares, whatever the model family (BERT-QA, Llama decoder).

A supernet is a teacher-shaped model whose units (heads or head groups, FFN neurons, ...)
are sorted by importance, most important first, so that every subnet is a *prefix slice* of
its weights: the first units of each kept layer. A family supplies how to build a model of
a subnet's shape (`ElasticModel.build`) and where its layers live in the parameter names;
this module supplies the slicing, the forward pass of a subnet over the shared weights, the
extraction into a standalone model, the Taylor importance of units and the permutations
that sort them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class ElasticModel(nn.Module):
    """A teacher-shaped model whose every subnet is a prefix slice of its weights.

    A subnet runs as the very model it will be extracted into (`build(subnet)` on the meta
    device, run with the sliced weights through `torch.func.functional_call`), so a subnet's
    outputs in the supernet and in the extracted model are the same computation, and the
    gradients of every subnet flow into the one shared set of weights.
    """

    layer_prefix: str  # parameter names of layer i start with f"{layer_prefix}{i}."

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model  # teacher-shaped, importance-ordered
        self.num_layers = num_layers  # layers of the teacher; a subnet keeps `subnet.layer_indices(num_layers)`

    def build(self, subnet) -> nn.Module:
        """An (uninitialised) model of the subnet's shape, on the current default device."""
        raise NotImplementedError

    def weights(self, subnet, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The subnet's tensors (parameters and buffers) named as in `like` (a state dict of the
        subnet's shape): prefix slices of the supernet's, copied contiguous (gradients flow back)."""
        # Tied weights (a decoder's lm_head and embeddings) appear under each of their names.
        full = (dict(self.model.named_parameters(remove_duplicate=False))
                | dict(self.model.named_buffers(remove_duplicate=False)))
        kept = subnet.layer_indices(self.num_layers)
        out = {}
        for name, target in like.items():
            source = name
            if name.startswith(self.layer_prefix):
                index, rest = name[len(self.layer_prefix):].split(".", 1)
                source = f"{self.layer_prefix}{kept[int(index)]}.{rest}"
            out[name] = full[source][tuple(slice(0, n) for n in target.shape)].contiguous()
        return out

    def forward(self, subnet, **inputs):
        """The subnet's outputs for `inputs` (keyword arguments of the built model's forward)."""
        with torch.device("meta"):
            skeleton = self.build(subnet)
        skeleton.train(self.training)
        tensors = self.weights(subnet, dict(skeleton.named_parameters()) | dict(skeleton.named_buffers()))
        return torch.func.functional_call(skeleton, tensors, args=(), kwargs=inputs)


def extract(supernet: ElasticModel, subnet) -> nn.Module:
    """A standalone, physically smaller model holding the subnet's slice of the weights."""
    model = supernet.build(subnet)
    with torch.no_grad():
        tensors = supernet.weights(subnet, model.state_dict())
    model.load_state_dict({k: v.detach().clone() for k, v in tensors.items()}, strict=True)
    return model.eval()


def taylor_importance(model: nn.Module, units: dict[str, tuple[list[nn.Linear], int]], batches: Iterable,
                      loss_fn: Callable[[nn.Module, object], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Importance of every unit of `model`: name -> [layers, units per layer].

    `units` maps a kind of unit to (the projection of each layer that reads the units, the
    input channels per unit): a unit is that many consecutive input channels of its layer's
    projection (an attention head, a key/value head with its query heads, an FFN neuron).
    Its score is the first-order Taylor estimate of the loss change when it is removed,
    |sum over tokens and its channels of activation x gradient| (Michel et al. 2019 for
    heads, DynaBERT for neurons), summed over the `batches` (loss_fn(model, batch) -> loss).
    """
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def keep(kind: str, i: int):
        def hook(_module, args):
            args[0].retain_grad()
            captured[(kind, i)] = args[0]
        return hook

    scores = {kind: torch.zeros(len(projections), projections[0].in_features // size)
              for kind, (projections, size) in units.items()}
    handles = [proj.register_forward_pre_hook(keep(kind, i))
               for kind, (projections, _) in units.items() for i, proj in enumerate(projections)]
    model.eval()  # no dropout: the estimate is of the deterministic model
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for kind, (projections, size) in units.items():
                for i in range(len(projections)):
                    act = captured[(kind, i)]  # [batch, seq, units * size]
                    taylor = (act * act.grad).reshape(*act.shape[:-1], -1, size)  # [batch, seq, units, size]
                    scores[kind][i] += taylor.sum(dim=(0, 1, 3)).abs().detach().cpu()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return scores


def unit_channels(order: torch.Tensor, size: int) -> torch.Tensor:
    """The channel permutation that puts units of `size` consecutive channels in `order`."""
    return (order[:, None] * size + torch.arange(size)).reshape(-1)


@torch.no_grad()
def permute_rows(linear: nn.Linear, perm: torch.Tensor) -> None:
    """Reorder the output channels of `linear` (what it writes)."""
    linear.weight.copy_(linear.weight[perm])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[perm])


@torch.no_grad()
def permute_cols(linear: nn.Linear, perm: torch.Tensor) -> None:
    """Reorder the input channels of `linear` (what it reads)."""
    linear.weight.copy_(linear.weight[:, perm])
