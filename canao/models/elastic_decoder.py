"""The elastic Llama decoder: every decoder subnet (canao.space.DecoderSubnet) shares the
teacher's weights.

The supernet is a teacher-shaped `LlamaForCausalLM` whose key/value heads (each with the
query heads that share it) and FFN neurons are sorted by importance, most important first,
so a subnet is a prefix slice of it (canao.models.elastic): in each kept block the first
`kv_heads` key/value heads, whose query heads are the first `kv_heads x group` ones
(transformers' grouped-query layout: query head h reads key/value head h // group), and the
first `ffn_size` neurons of the gate, up and down projections. Embeddings, norms and the
(tied) output head are the teacher's. A subnet is extracted into a plain `LlamaForCausalLM`
with an explicit `head_dim`, so it loads with `from_pretrained`, runs in
`llama_lm.KVCacheStep` and compiles with `canao compile-lm` like the teacher.
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from canao.models.elastic import ElasticModel, permute_cols, permute_rows, taylor_importance, unit_channels
from canao.space import DecoderSubnet, decoder_shape

# Keys of a saved LlamaConfig that describe the file rather than the model.
_NOT_SHAPE = ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype")


def subnet_config(teacher: LlamaConfig, subnet: DecoderSubnet) -> LlamaConfig:
    """The transformers config of `subnet` of `teacher` (vocabulary, RoPE, norms, special tokens kept)."""
    shape = decoder_shape(teacher)
    group = shape.num_heads // shape.num_kv_heads
    base = {k: v for k, v in teacher.to_dict().items() if k not in _NOT_SHAPE}
    base.update(num_hidden_layers=subnet.num_layers, num_attention_heads=subnet.kv_heads * group,
                num_key_value_heads=subnet.kv_heads, intermediate_size=subnet.ffn_size,
                head_dim=shape.hidden_size // shape.num_heads)
    return LlamaConfig(**base)


class DecoderSupernet(ElasticModel):
    layer_prefix = "model.layers."

    def __init__(self, model: LlamaForCausalLM):
        self.shape = decoder_shape(model.config)
        super().__init__(model, self.shape.num_layers)

    def build(self, subnet: DecoderSubnet) -> LlamaForCausalLM:
        model = LlamaForCausalLM(subnet_config(self.model.config, subnet))
        model.generation_config = copy.deepcopy(self.model.generation_config)  # EOS and defaults of the teacher
        return model


def importance(model: LlamaForCausalLM, windows: torch.Tensor, batches: int, batch_size: int) -> dict:
    """Taylor importance (canao.models.elastic.taylor_importance) of every key/value head group
    ("kv_heads": [layers, kv heads]) and FFN neuron ("neurons": [layers, ffn]) of `model`, on the
    next-token loss of `batches` batches of token `windows` [N, T]."""
    shape = decoder_shape(model.config)
    group_channels = shape.hidden_size // shape.num_kv_heads  # a KV head's query heads, side by side in o_proj's input
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    count = min(batches, -(-len(windows) // batch_size))
    chosen = [windows[order[b * batch_size : (b + 1) * batch_size]] for b in range(count)]
    layers = model.model.layers
    return taylor_importance(model, {
        "kv_heads": ([layer.self_attn.o_proj for layer in layers], group_channels),
        "neurons": ([layer.mlp.down_proj for layer in layers], 1),
    }, chosen, lambda net, ids: net(input_ids=ids, labels=ids).loss)


@torch.no_grad()
def sort_by_importance(model: LlamaForCausalLM, scores: dict) -> None:
    """Permute `model`'s key/value head groups and FFN neurons in place, most important first.
    The function the model computes does not change (each permutation is applied to the
    weights that write a unit and to those that read it; RoPE acts within a head, so whole
    heads move freely)."""
    shape = decoder_shape(model.config)
    head_size = shape.hidden_size // shape.num_heads
    group = shape.num_heads // shape.num_kv_heads
    for i, layer in enumerate(model.model.layers):
        kv_order = torch.argsort(scores["kv_heads"][i], descending=True, stable=True)
        queries, kv = unit_channels(kv_order, group * head_size), unit_channels(kv_order, head_size)
        attn = layer.self_attn
        permute_rows(attn.q_proj, queries)
        permute_rows(attn.k_proj, kv)
        permute_rows(attn.v_proj, kv)
        permute_cols(attn.o_proj, queries)
        neurons = torch.argsort(scores["neurons"][i], descending=True, stable=True)
        permute_rows(layer.mlp.gate_proj, neurons)
        permute_rows(layer.mlp.up_proj, neurons)
        permute_cols(layer.mlp.down_proj, neurons)
