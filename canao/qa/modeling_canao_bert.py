"""BERT for extractive QA with per-layer attention heads and FFN widths: a searched subnet.

A plain `BertConfig` has one head count and one FFN width for every layer; a subnet found
by the search has its own per layer. This file is self-contained (torch and transformers
only): `save_pretrained` copies it next to the weights and names it in config.json's
`auto_map`, so any environment with transformers loads a student with
`AutoModelForQuestionAnswering.from_pretrained(dir, trust_remote_code=True)`, canao or not.
canao itself never runs that copy: `register_local` gives transformers' Auto classes these
classes, as installed, and canao's loaders pass `trust_remote_code=False`.
"""

from torch import nn
from transformers import AutoConfig, AutoModelForQuestionAnswering, BertConfig, BertForQuestionAnswering


class CanaoBertConfig(BertConfig):
    model_type = "canao_bert"

    def __init__(self, layer_heads=None, layer_ffn_sizes=None, **kwargs):
        super().__init__(**kwargs)
        # attention heads of each layer; every head is hidden_size / num_attention_heads wide
        self.layer_heads = list(layer_heads or [self.num_attention_heads] * self.num_hidden_layers)
        # FFN (intermediate) width of each layer
        self.layer_ffn_sizes = list(layer_ffn_sizes or [self.intermediate_size] * self.num_hidden_layers)
        for name in ("layer_heads", "layer_ffn_sizes"):
            if len(getattr(self, name)) != self.num_hidden_layers:
                raise ValueError(f"{name}: {len(getattr(self, name))} values for {self.num_hidden_layers} layers")


class CanaoBertForQuestionAnswering(BertForQuestionAnswering):
    config_class = CanaoBertConfig

    def __init__(self, config: CanaoBertConfig):
        super().__init__(config)
        hidden = config.hidden_size
        head_size = hidden // config.num_attention_heads
        for layer, heads, ffn in zip(self.bert.encoder.layer, config.layer_heads, config.layer_ffn_sizes, strict=True):
            width = heads * head_size  # attention width of this layer
            attention = layer.attention.self
            # The attention reshapes to (-1 heads, head_size), so only the projections change size.
            attention.query, attention.key, attention.value = (nn.Linear(hidden, width) for _ in range(3))
            attention.num_attention_heads, attention.all_head_size = heads, width
            layer.attention.output.dense = nn.Linear(width, hidden)
            layer.intermediate.dense = nn.Linear(hidden, ffn)
            layer.output.dense = nn.Linear(ffn, hidden)
        self.post_init()


# save_pretrained then copies this file beside the weights and writes config.json's auto_map.
CanaoBertConfig.register_for_auto_class()
CanaoBertForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")


def register_local() -> None:
    """Let the Auto classes load a student with the classes of this file as installed, so that a
    loader passing `trust_remote_code=False` never executes the copy saved in a student's
    directory (whoever can write a bucket could have changed it)."""
    AutoConfig.register(CanaoBertConfig.model_type, CanaoBertConfig, exist_ok=True)
    AutoModelForQuestionAnswering.register(CanaoBertConfig, CanaoBertForQuestionAnswering, exist_ok=True)
