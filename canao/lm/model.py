"""The decoder LM for text generation as the stages and compilers see it: a Llama-architecture
`transformers` causal LM, its KV-cache step, and the elastic decoder supernet over it.

`KVCacheStep` runs any Llama-architecture causal LM (any depth, width, heads, KV heads, FFN
width) one chunk of tokens at a time over a static key/value cache that is an explicit
input and output: one static shape per chunk length, which torch.export and TVM compile as
they are (a growing cache would need dynamic shapes).

The elastic decoder (`DecoderSupernet`) shares the teacher's weights among every subnet of
canao.lm.space: KV-head groups (each with its query heads) and FFN neurons sorted by
importance, so a subnet is a prefix slice of each kept layer (canao.codesign.elastic says
how); the residual stream stays the teacher's width.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from canao.codesign.elastic import ElasticModel, permute_cols, permute_rows, taylor_importance, unit_channels
from canao.lm.space import DecoderSubnet, decoder_shape


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
    return _eos_ids(model.generation_config, model.config, tokenizer)


def saved_eos_token_ids(model_dir: str | Path, tokenizer) -> tuple[int, ...]:
    """`eos_token_ids` of the model saved in `model_dir`, from its config files alone (no weights loaded)."""
    config = AutoConfig.from_pretrained(model_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: transformers derives one from the model config, as here
        generation = GenerationConfig.from_model_config(config)
    return _eos_ids(generation, config, tokenizer)


def _eos_ids(generation: GenerationConfig, config, tokenizer) -> tuple[int, ...]:
    ids = generation.eos_token_id or config.eos_token_id
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
    """Taylor importance (canao.codesign.elastic.taylor_importance) of every key/value head group
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
def block_influence(model: LlamaForCausalLM, windows: torch.Tensor, batches: int, batch_size: int) -> list[float]:
    """How much each block changes the residual stream it is given, on the first `batches`
    batches of token `windows` [N, T]: 1 - the mean cosine similarity of its output to its input
    over every token (ShortGPT's block influence, Men et al. 2024). A block that leaves its input
    nearly as it was is the one a shallower decoder misses least."""
    layers = model.model.layers
    change = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0

    def hook(index: int):
        def record(module, args, kwargs, output):
            given = (args[0] if args else kwargs["hidden_states"]).float()  # [B, T, H]
            made = (output[0] if isinstance(output, tuple) else output).float()
            change[index] += (1 - torch.nn.functional.cosine_similarity(made, given, dim=-1)).sum().double()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for begin in range(0, min(len(windows), batches * batch_size), batch_size):
            ids = windows[begin : begin + batch_size]
            model(input_ids=ids)
            tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return (change / tokens).tolist()


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
