"""The elastic BERT-QA supernet: every subnet of the search space shares the teacher's weights.

The supernet is a teacher-shaped `BertForQuestionAnswering` whose heads, FFN neurons and
residual channels are sorted by importance (most important first), so every subnet is a
*prefix slice* of it: the first `hidden_size` residual channels, the first `heads` heads
and the first `ffn` neurons of each kept layer. A subnet runs as the very model it will be
extracted into, `CanaoBertForQuestionAnswering` of the subnet's shape (canao.models.elastic
says how).
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForQuestionAnswering

from canao.data.squad import Features
from canao.models.elastic import ElasticModel, permute_cols, permute_rows, taylor_importance, unit_channels
from canao.models.modeling_canao_bert import CanaoBertConfig, CanaoBertForQuestionAnswering
from canao.space import SubnetConfig, TeacherShape

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


class Supernet(ElasticModel):
    layer_prefix = "bert.encoder.layer."

    def __init__(self, model: BertForQuestionAnswering):
        self.shape = TeacherShape.of(model.config)
        super().__init__(model, self.shape.num_layers)

    def subnet_config(self, subnet: SubnetConfig) -> CanaoBertConfig:
        return subnet_config(self.model.config, subnet)

    def build(self, subnet: SubnetConfig) -> CanaoBertForQuestionAnswering:
        return CanaoBertForQuestionAnswering(self.subnet_config(subnet))


def importance(model: BertForQuestionAnswering, features: Features, batches: int, batch_size: int) -> dict:
    """Importance of every head, FFN neuron and residual channel of `model`.

    Heads and neurons: their Taylor importance (canao.models.elastic.taylor_importance) on
    the span loss of `batches` batches of training windows. Residual channels have no single
    activation to mask (every LayerNorm renormalises them), so they are ranked by the summed
    magnitude of their LayerNorm scales across the network.
    """
    layers = model.bert.encoder.layer
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
    count = min(batches, -(-len(features) // batch_size))
    chosen = [order[b * batch_size : (b + 1) * batch_size] for b in range(count)]

    def span_loss(net, index):
        return net(**features.model_inputs(index), start_positions=features.start_positions[index],
                   end_positions=features.end_positions[index]).loss

    scores = taylor_importance(model, {
        "heads": ([layer.attention.output.dense for layer in layers], TeacherShape.of(model.config).head_size),
        "neurons": ([layer.output.dense for layer in layers], 1),
    }, chosen, span_loss)
    norms = [model.bert.embeddings.LayerNorm] + [m for layer in layers
                                                 for m in (layer.attention.output.LayerNorm, layer.output.LayerNorm)]
    return {**scores, "channels": sum(n.weight.detach().abs() for n in norms)}


@torch.no_grad()
def sort_by_importance(model: BertForQuestionAnswering, scores: dict) -> None:
    """Permute `model`'s heads, neurons and residual channels in place, most important first.
    The function the model computes does not change (every permutation is applied to both
    the weights that write a unit and those that read it)."""
    shape = TeacherShape.of(model.config)
    channels = torch.argsort(scores["channels"], descending=True, stable=True)
    emb = model.bert.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        table.weight.copy_(table.weight[:, channels])
    norms = [emb.LayerNorm]
    for i, layer in enumerate(model.bert.encoder.layer):
        head_units = unit_channels(torch.argsort(scores["heads"][i], descending=True, stable=True), shape.head_size)
        neurons = torch.argsort(scores["neurons"][i], descending=True, stable=True)
        attention = layer.attention.self
        for proj in (attention.query, attention.key, attention.value):
            permute_rows(proj, head_units)
            permute_cols(proj, channels)
        permute_cols(layer.attention.output.dense, head_units)
        permute_rows(layer.attention.output.dense, channels)
        permute_rows(layer.intermediate.dense, neurons)
        permute_cols(layer.intermediate.dense, channels)
        permute_cols(layer.output.dense, neurons)
        permute_rows(layer.output.dense, channels)
        norms += [layer.attention.output.LayerNorm, layer.output.LayerNorm]
    for norm in norms:
        norm.weight.copy_(norm.weight[channels])
        norm.bias.copy_(norm.bias[channels])
    permute_cols(model.qa_outputs, channels)
