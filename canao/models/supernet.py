"""The elastic BERT-QA supernet: every subnet of the search space shares the teacher's weights.

The supernet is a teacher-shaped `BertForQuestionAnswering` whose heads, FFN neurons and
residual channels are sorted by importance (most important first), so every subnet is a
*prefix slice* of it: the first `hidden_size` residual channels, the first `heads` heads
and the first `ffn` neurons of each kept layer. A subnet runs as the very model it will
be extracted into (`CanaoBertForQuestionAnswering` of the subnet's shape, built on the meta
device and run with the sliced weights through `torch.func.functional_call`), so the
supernet's outputs for a subnet and the extracted model's are the same computation, and
gradients of every subnet flow into the one shared set of weights.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import BertConfig, BertForQuestionAnswering

from canao.data.squad import Features
from canao.models.modeling_canao_bert import CanaoBertConfig, CanaoBertForQuestionAnswering
from canao.space import SubnetConfig, TeacherShape

_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")
# Keys of a saved BertConfig that describe the file rather than the model.
_NOT_SHAPE = ("model_type", "architectures", "transformers_version", "auto_map", "layer_heads", "layer_ffn_sizes",
              "dtype", "torch_dtype")


def subnet_config(teacher: BertConfig, subnet: SubnetConfig) -> CanaoBertConfig:
    """The transformers config of `subnet` of `teacher` (vocabulary, positions, activations kept)."""
    base = {k: v for k, v in teacher.to_dict().items() if k not in _NOT_SHAPE}
    base.update(num_hidden_layers=subnet.num_layers, hidden_size=subnet.hidden_size,
                num_attention_heads=subnet.hidden_size // TeacherShape.of(teacher).head_size,
                intermediate_size=max(subnet.ffn_sizes), layer_heads=list(subnet.heads),
                layer_ffn_sizes=list(subnet.ffn_sizes))
    return CanaoBertConfig(**base)


class Supernet(nn.Module):
    def __init__(self, model: BertForQuestionAnswering):
        super().__init__()
        self.model = model  # teacher-shaped, importance-ordered
        self.shape = TeacherShape.of(model.config)

    def subnet_config(self, subnet: SubnetConfig) -> CanaoBertConfig:
        return subnet_config(self.model.config, subnet)

    def weights(self, subnet: SubnetConfig, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The subnet's tensors (parameters and buffers) named as in `like` (a state dict of the
        subnet's shape): prefix slices of the supernet's, copied contiguous (gradients flow back)."""
        full = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        kept = subnet.layer_indices(self.shape.num_layers)
        out = {}
        for name, target in like.items():
            source = _LAYER.sub(lambda m: f"bert.encoder.layer.{kept[int(m.group(1))]}.", name)
            out[name] = full[source][tuple(slice(0, n) for n in target.shape)].contiguous()
        return out

    def forward(self, subnet: SubnetConfig, output_hidden_states: bool = False, **inputs):
        """The subnet's QA outputs for `inputs` (input_ids, token_type_ids, attention_mask, ...)."""
        with torch.device("meta"):
            skeleton = CanaoBertForQuestionAnswering(self.subnet_config(subnet))
        skeleton.train(self.training)
        tensors = self.weights(subnet, dict(skeleton.named_parameters()) | dict(skeleton.named_buffers()))
        return torch.func.functional_call(skeleton, tensors, args=(),
                                          kwargs={**inputs, "output_hidden_states": output_hidden_states})


def extract(supernet: Supernet, subnet: SubnetConfig) -> CanaoBertForQuestionAnswering:
    """A standalone, physically smaller QA model holding the subnet's slice of the weights."""
    model = CanaoBertForQuestionAnswering(supernet.subnet_config(subnet))
    with torch.no_grad():
        tensors = supernet.weights(subnet, model.state_dict())
    model.load_state_dict({k: v.detach().clone() for k, v in tensors.items()}, strict=True)
    return model.eval()


def importance(model: BertForQuestionAnswering, features: Features, batches: int, batch_size: int) -> dict:
    """Importance of every head, FFN neuron and residual channel of `model`.

    Heads and neurons: first-order Taylor estimate of the loss change when the unit is
    removed, |sum over tokens of activation x gradient| (Michel et al. 2019 for heads,
    DynaBERT for neurons), summed over `batches` batches of training windows. Residual
    channels have no single activation to mask (every LayerNorm renormalises them), so
    they are ranked by the summed magnitude of their LayerNorm scales across the network.
    """
    layers = model.bert.encoder.layer
    shape = TeacherShape.of(model.config)
    head_scores = torch.zeros(shape.num_layers, shape.num_heads)
    neuron_scores = torch.zeros(shape.num_layers, shape.ffn_size)
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def keep(kind: str, i: int):
        def hook(_module, args):
            args[0].retain_grad()
            captured[(kind, i)] = args[0]
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.attention.output.dense.register_forward_pre_hook(keep("heads", i)))
        handles.append(layer.output.dense.register_forward_pre_hook(keep("neurons", i)))
    model.eval()  # no dropout: the estimate is of the deterministic model
    try:
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
        for b in range(min(batches, -(-len(features) // batch_size))):
            index = order[b * batch_size : (b + 1) * batch_size]
            out = model(**features.model_inputs(index), start_positions=features.start_positions[index],
                        end_positions=features.end_positions[index])
            model.zero_grad(set_to_none=True)
            out.loss.backward()
            for i in range(shape.num_layers):
                ctx = captured[("heads", i)]  # [batch, seq, heads * head_size]
                taylor = (ctx * ctx.grad).reshape(*ctx.shape[:2], shape.num_heads, shape.head_size)
                head_scores[i] += taylor.sum(dim=(0, 1, 3)).abs().detach()
                act = captured[("neurons", i)]  # [batch, seq, ffn]
                neuron_scores[i] += (act * act.grad).sum(dim=(0, 1)).abs().detach()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    norms = [model.bert.embeddings.LayerNorm] + [m for layer in layers
                                                 for m in (layer.attention.output.LayerNorm, layer.output.LayerNorm)]
    channel_scores = sum(n.weight.detach().abs() for n in norms)
    return {"heads": head_scores, "neurons": neuron_scores, "channels": channel_scores}


@torch.no_grad()
def sort_by_importance(model: BertForQuestionAnswering, scores: dict) -> None:
    """Permute `model`'s heads, neurons and residual channels in place, most important first.
    The function the model computes does not change (every permutation is applied to both
    the weights that write a unit and those that read it)."""
    shape = TeacherShape.of(model.config)
    channels = torch.argsort(scores["channels"], descending=True, stable=True)

    def rows(linear: nn.Linear, perm: torch.Tensor) -> None:
        linear.weight.copy_(linear.weight[perm])
        linear.bias.copy_(linear.bias[perm])

    def cols(linear: nn.Linear, perm: torch.Tensor) -> None:
        linear.weight.copy_(linear.weight[:, perm])

    emb = model.bert.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        table.weight.copy_(table.weight[:, channels])
    norms = [emb.LayerNorm]
    for i, layer in enumerate(model.bert.encoder.layer):
        heads = torch.argsort(scores["heads"][i], descending=True, stable=True)
        head_units = (heads[:, None] * shape.head_size + torch.arange(shape.head_size)).reshape(-1)
        neurons = torch.argsort(scores["neurons"][i], descending=True, stable=True)
        attention = layer.attention.self
        for proj in (attention.query, attention.key, attention.value):
            rows(proj, head_units)
            cols(proj, channels)
        cols(layer.attention.output.dense, head_units)
        rows(layer.attention.output.dense, channels)
        rows(layer.intermediate.dense, neurons)
        cols(layer.intermediate.dense, channels)
        cols(layer.output.dense, neurons)
        rows(layer.output.dense, channels)
        norms += [layer.attention.output.LayerNorm, layer.output.LayerNorm]
    for norm in norms:
        norm.weight.copy_(norm.weight[channels])
        norm.bias.copy_(norm.bias[channels])
    cols(model.qa_outputs, channels)
