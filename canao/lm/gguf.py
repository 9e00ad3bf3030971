"""A Llama-architecture `transformers` causal LM (the teacher or an extracted student) as a GGUF
file that llama.cpp runs: the generation peer's own runtime, so that a student is timed in the
fastest CPU runtime for this model, exactly as the teacher is.

The file copies the teacher GGUF's tokenizer metadata (vocabulary, merges, chat template,
special tokens: every decoder of the family shares them) and describes the exported model's
own shape, RoPE base and norm epsilon. Weights are written as the teacher file stores them
("teacher": Q8_0 token embeddings, Q4_1 matmul weights, float32 norms), so teacher and student
compare at the same precision; all in float32 ("f32"), which reproduces PyTorch's logits (the
tests' check); or every matrix, the tied embedding and output matrix included, in one of
llama.cpp's block formats ("q8_0", "q4_0": the 4-bit format llama.cpp repacks for its
AVX2/AVX-512 matmul kernels on load, where it leaves the teacher's Q4_1 as stored). Norms stay
float32 in every precision.
Query and key projections are permuted from Hugging Face's rotate-half RoPE layout to GGML's
interleaved one, as llama.cpp's own converter does.

`open_llama_cpp` runs such a file in llama.cpp (llama-cpp-python); `GGUFModel` is that run as
canao.lm.data.perplexity scores a model, so a GGUF's perplexity is llama.cpp's own, quantized
weights and kernels included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, quants

from canao.lm.config import GGUF_PRECISIONS
from canao.lm.data import PPL_WINDOW
from canao.lm.model import head_size, load_causal_lm
from canao.lm.teacher import teacher_gguf

GGUF_FILE = "model.gguf"  # where a model directory keeps its llama.cpp export
# Storage of the matrices (2-D tensors) by precision; None: as the teacher file stores each role.
MATRIX_TYPES = {"teacher": None, "f32": GGMLQuantizationType.F32, "q8_0": GGMLQuantizationType.Q8_0,
                "q4_0": GGMLQuantizationType.Q4_0, "q4_0-q8_0-embd": GGMLQuantizationType.Q4_0}
PRECISIONS = GGUF_PRECISIONS
assert tuple(MATRIX_TYPES) == PRECISIONS
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
              "q4_0-q8_0-embd": LlamaFileType.MOSTLY_Q4_0}
EMBEDDING = "token_embd.weight"  # the tied input embedding, which is also the output matrix
# Where a precision stores the embedding otherwise than its other matrices: the teacher's 4-bit
# output matrix cost 39 % perplexity in q4_0 (README), as llama.cpp's own quantizer also knows.
EMBEDDING_TYPES = {"q4_0-q8_0-embd": GGMLQuantizationType.Q8_0}

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


def open_llama_cpp(path: str | Path, n_ctx: int, threads: int, logits_all: bool = False):
    """llama.cpp on the GGUF file `path`: a context of `n_ctx` tokens, `threads` threads for prompts
    and decoding alike, the logits of every evaluated token kept where `logits_all` (else of none)."""
    import llama_cpp

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False)


class GGUFModel:
    """A GGUF file in llama.cpp as canao.lm.data.perplexity scores a model: the logits of one window
    of token ids at a time, each from an empty cache."""

    def __init__(self, path: str | Path, window: int, threads: int):
        self.llm = open_llama_cpp(path, window, threads, logits_all=True)

    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[tokens] int64 -> [tokens, vocab] float32: the next-token logits after each prefix."""
        self.llm.reset()  # eval then drops every cached position
        self.llm.eval(ids.tolist())
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)]))


def scored_within(metrics: dict, tol: float) -> bool:
    """Whether finalize-lm scored a model's GGUF export (manifest metric `gguf_perplexity`, llama.cpp's
    own perplexity of the file) within relative `tol` of the model's PyTorch perplexity (`perplexity`):
    the rule by which llama.cpp may serve it. A file never scored is not within."""
    exported, own = metrics.get("gguf_perplexity"), metrics.get("perplexity")
    return bool(exported and own and exported <= own * (1 + tol))


def gguf_model(model_dir: str | Path, threads: int) -> GGUFModel:
    """The GGUFModel of `model_dir`'s own GGUF export, in windows of the perplexity protocol."""
    path = exported_gguf(model_dir)
    if path is None:
        raise FileNotFoundError(f"{model_dir}: no {GGUF_FILE} (canao export-gguf --model {model_dir} writes it)")
    return GGUFModel(path, PPL_WINDOW, threads)


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
    teacher_types = _teacher_types(reader)  # role -> type
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
    writer.add_file_type(int(reader.fields["general.file_type"].contents()) if precision == "teacher"
                         else FILE_TYPES[precision].value)
    _copy_metadata(reader, writer)
    for name, array in _tensors(model).items():
        qtype = EMBEDDING_TYPES.get(precision) if name == EMBEDDING else None
        qtype = qtype or MATRIX_TYPES[precision]
        if qtype is None:
            qtype = teacher_types.get(_role(name), GGMLQuantizationType.F32)
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
