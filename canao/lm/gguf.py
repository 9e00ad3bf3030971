"""A Llama-architecture `transformers` causal LM (the teacher or an extracted student) as a GGUF
file that llama.cpp runs: the generation peer's own runtime, so that a student is timed in the
fastest CPU runtime for this model, exactly as the teacher is.

The file copies the teacher GGUF's tokenizer metadata (vocabulary, merges, chat template,
special tokens: every decoder of the family shares them) and describes the exported model's
own shape, RoPE base and norm epsilon. Weights are written as the teacher file stores them
("teacher": Q8_0 token embeddings, Q4_1 matmul weights, float32 norms), so teacher and student
compare at the same precision, or all in float32 ("f32"), which reproduces PyTorch's logits
(the tests' check).
Query and key projections are permuted from Hugging Face's rotate-half RoPE layout to GGML's
interleaved one, as llama.cpp's own converter does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

from canao.lm.model import head_size, load_causal_lm
from canao.lm.teacher import teacher_gguf

GGUF_FILE = "model.gguf"  # where a model directory keeps its llama.cpp export
PRECISIONS = ("teacher", "f32")

# The teacher file's metadata that holds for every decoder of the family; the rest (shape, name,
# file type) is the exported model's own.
_SHARED_KEYS = ("tokenizer.", "general.license", "general.quantization_version")


def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """[heads * head_dim, hidden] from rotate-half order to interleaved pairs, per head."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _tensors(model) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array ([out, in] for matmul weights, as PyTorch stores them)."""
    c = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            f"blk.{i}.attn_norm.weight": state[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": _rope_permute(state[p + "self_attn.q_proj.weight"], c.num_attention_heads),
            f"blk.{i}.attn_k.weight": _rope_permute(state[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
            f"blk.{i}.attn_v.weight": state[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": state[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": state[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": state[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": state[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": state[p + "mlp.down_proj.weight"],
        }
    return out


def exported_gguf(model_dir: str | Path) -> Path | None:
    """The model directory's own GGUF export (GGUF_FILE), if it has one."""
    path = Path(model_dir) / GGUF_FILE
    return path if path.is_file() else None


def _role(name: str) -> str:
    """A tensor's name without its block: what it is in every block ("attn_q.weight")."""
    return name.split(".", 2)[-1] if name.startswith("blk.") else name


def _teacher_types(reader: GGUFReader) -> dict[str, GGMLQuantizationType]:
    """Storage type by tensor role ("token_embd.weight", "attn_q.weight", ...) in the teacher file."""
    return {_role(t.name): t.tensor_type for t in reader.tensors}


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    for key, field in reader.fields.items():
        if not key.startswith(_SHARED_KEYS):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def export_gguf(model_dir: str | Path, out_file: str | Path, precision: str = "teacher") -> Path:
    """Write the causal LM of `model_dir` to `out_file` as a llama.cpp GGUF (see the module doc)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    model = load_causal_lm(model_dir)
    c = model.config
    reader = GGUFReader(teacher_gguf())
    if int(reader.fields["llama.vocab_size"].contents()) != c.vocab_size:
        raise ValueError(f"{model_dir}: vocabulary of {c.vocab_size}, not the teacher tokenizer's; cannot share "
                         "its GGUF tokenizer")
    stored_as = _teacher_types(reader) if precision == "teacher" else {}  # role -> type; the rest float32
    head_dim = head_size(c)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    writer = GGUFWriter(partial, "llama")
    writer.add_name(model_dir.name)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_vocab_size(c.vocab_size)
    # A student keeps the teacher's head size with fewer heads, so it is not hidden / heads.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_file_type(int(reader.fields["general.file_type"].contents()) if precision == "teacher" else 0)
    _copy_metadata(reader, writer)
    for name, array in _tensors(model).items():
        qtype = stored_as.get(_role(name), GGMLQuantizationType.F32)
        if qtype == GGMLQuantizationType.F32 or array.ndim == 1:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        else:
            writer.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out_file)
    return out_file
