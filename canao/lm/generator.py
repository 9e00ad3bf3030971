"""Text generation with a KV cache: greedy, top-k and top-p sampling, streamed token by token.

One loop drives four kinds of decoder: a `canao compile-lm` artifact (the TVM prefill and
decode steps), a plain model directory (PyTorch eager, the same KVCacheStep), that step
converted to LiteRT (`litert_steps`) and the directory's GGUF export in llama.cpp (its own
cache), so every runtime is checked against PyTorch token for token and all are timed alike.

The prompt is fed in chunks of the decoder's prefill length (the last one padded for the
static compiled step), then one token per step. Time to first token counts from the first
prefill call to the first sampled token; ms/token is the mean time of each later token.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from canao.compile.peers import LiteRTRunner, convert_litert
from canao.config import LM_DIR_BACKENDS, resolve_path
from canao.lm import model as lm_model
from canao.lm.config import LMCompileConfig
from canao.manifest import read_manifest, sha256_file, verify_stage


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax); otherwise logits are divided by it before sampling
    top_k: int = 0  # sample among the k most likely tokens only; 0: no limit
    top_p: float = 1.0  # sample among the most likely tokens whose probabilities add up to top_p; 1: no limit
    seed: int = 0  # the sampler's random seed

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from next-token `logits` [V]."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    # Shifted so that the largest is 0 before dividing: a tiny temperature overflows the others to -inf
    # (probability 0), never to NaN.
    with np.errstate(over="ignore"):
        z = (logits.astype(np.float64) - logits.max()) / sampling.temperature
    order = np.argsort(-z, kind="stable")  # most likely first
    keep = len(z) if sampling.top_k == 0 else min(sampling.top_k, len(z))
    probs = np.exp(z[order[:keep]])
    probs /= probs.sum()
    # The smallest prefix whose mass reaches top_p (at least one token).
    keep = min(len(probs), int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1)
    probs = probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(keep, p=probs)])


class TorchDecoder:
    """A model directory in PyTorch eager through KVCacheStep: any prompt length in one chunk."""

    backend = "torch"

    def __init__(self, model_dir: str | Path, max_context: int = LMCompileConfig.max_context):
        self.model = lm_model.load_causal_lm(model_dir)
        self.tokenizer = lm_model.load_tokenizer(model_dir)
        self.eos_token_ids = lm_model.eos_token_ids(self.model, self.tokenizer)
        self.step = lm_model.KVCacheStep(self.model, max_context).eval()
        self.max_context = self.prefill_len = max_context
        self.pads_chunks = False

    def empty_cache(self):
        return self.step.empty_cache()

    @torch.inference_mode()
    def __call__(self, tokens: np.ndarray, start: int, last: int, keys, values):
        logits, keys, values = self.step(torch.from_numpy(tokens), torch.tensor([start]), torch.tensor([last]),
                                         keys, values)
        return logits[0].numpy(), keys, values


class TVMDecoder:
    """A `canao compile-lm` artifact on this machine's CPU: its prefill and decode libraries. The
    cache stays in TVM tensors between steps; only the logits come back to numpy."""

    backend = "tvm"

    def __init__(self, artifact_dir: str | Path):
        import tvm
        from tvm import relax

        artifact_dir = Path(artifact_dir)
        manifest = verify_stage(artifact_dir, "compile-lm", "a compiled decoder (compile-lm)")
        self._tensor, self._device = tvm.runtime.tensor, tvm.cpu()
        self.vms = {phase: relax.VirtualMachine(tvm.runtime.load_module(str(artifact_dir / path)), self._device)
                    for phase, path in manifest["backends"].items()}
        self.tokenizer = lm_model.load_tokenizer(artifact_dir)
        self.eos_token_ids = tuple(manifest["eos_token_ids"])
        self.max_context = manifest["config"]["max_context"]
        self.prefill_len = manifest["config"]["prefill_len"]
        self.pads_chunks = True
        self._cache_shape = lm_model.cache_shape(AutoConfig.from_pretrained(artifact_dir), self.max_context)

    def empty_cache(self):
        return tuple(self._tensor(np.zeros(self._cache_shape, np.float32), self._device) for _ in range(2))

    def __call__(self, tokens: np.ndarray, start: int, last: int, keys, values):
        vm = self.vms["decode" if tokens.shape[1] == 1 else "prefill"]
        logits, keys, values = vm["main"](self._tensor(tokens), self._tensor(np.array([start], np.int64)),
                                          self._tensor(np.array([last], np.int64)), keys, values)
        return logits.numpy()[0], keys, values


LITERT_STEPS_DIR = "outputs/compiled/litert-lm"  # converted decoders, one directory per weights and cache shape
LITERT_STEPS_FILE = "steps.json"  # in each: the model directory, the cache's shape, the EOS ids


def export_litert_step(model_dir: str | Path, max_context: int, tokens: int, path: str | Path) -> Path:
    """One KV-cache step of the decoder of `model_dir` (canao.lm.model.KVCacheStep: `tokens`
    tokens over a cache of `max_context` positions) as LiteRT, float32, converted by
    canao.lm.litert in the converter's own environment."""
    return convert_litert("canao.lm.litert", model_dir, path,
                          ["--max-context", str(max_context), "--seq-len", str(tokens)])


def litert_steps(model_dir: str | Path, cfg: LMCompileConfig, root: str | Path | None = None) -> Path:
    """The decode step and the prefill chunk of `model_dir`'s decoder as LiteRT files over a cache
    of `cfg.max_context` positions (export_litert_step), in a directory under `root`
    (default LITERT_STEPS_DIR) named by the weights and the shapes; converted once, then reused."""
    model_dir = Path(model_dir)
    weights = sha256_file(model_dir / "model.safetensors")[:16]
    out = resolve_path(root or LITERT_STEPS_DIR) / f"{weights}-c{cfg.max_context}-p{cfg.prefill_len}"
    if (out / LITERT_STEPS_FILE).is_file():
        return out
    work = out.with_name(out.name + ".partial")  # renamed when complete: a killed conversion leaves no look-alike
    shutil.rmtree(work, ignore_errors=True)
    for phase, tokens in (("decode", 1), ("prefill", cfg.prefill_len)):
        export_litert_step(model_dir, cfg.max_context, tokens, work / f"{phase}.tflite")
    eos = lm_model.saved_eos_token_ids(model_dir, lm_model.load_tokenizer(model_dir))
    (work / LITERT_STEPS_FILE).write_text(json.dumps({
        "model": str(model_dir.resolve()), "max_context": cfg.max_context, "prefill_len": cfg.prefill_len,
        "eos_token_ids": list(eos)}, indent=1) + "\n")
    work.rename(out)
    return out


class LiteRTDecoder:
    """A `litert_steps` directory on the LiteRT interpreter: the decode step for one token, the
    prefill step for a chunk. The cache goes in and comes back as numpy arrays on every call."""

    backend = "litert"

    def __init__(self, steps_dir: str | Path, threads: int = 1):
        steps_dir = Path(steps_dir)
        info = json.loads((steps_dir / LITERT_STEPS_FILE).read_text())
        self.steps = {phase: LiteRTRunner(steps_dir / f"{phase}.tflite", threads, "litert", inputs=lm_model.STEP_INPUTS,
                                          outputs=lm_model.STEP_OUTPUTS) for phase in ("decode", "prefill")}
        self.version = self.steps["decode"].version
        self.tokenizer = lm_model.load_tokenizer(info["model"])
        self.eos_token_ids = tuple(info["eos_token_ids"])
        self.max_context, self.prefill_len = info["max_context"], info["prefill_len"]
        self.pads_chunks = True
        self._cache_shape = lm_model.cache_shape(AutoConfig.from_pretrained(info["model"]), self.max_context)

    def empty_cache(self):
        return np.zeros(self._cache_shape, np.float32), np.zeros(self._cache_shape, np.float32)

    def __call__(self, tokens: np.ndarray, start: int, last: int, keys, values):
        step = self.steps["decode" if tokens.shape[1] == 1 else "prefill"]
        logits, keys, values = step(tokens, np.array([start]), np.array([last]), keys, values)
        return logits[0], keys, values


class LlamaCppDecoder:
    """A model directory's GGUF export (canao.lm.gguf.GGUF_FILE) in llama.cpp, the fastest CPU
    runtime measured for these decoders (BENCHMARKS.md, Text generation). llama.cpp keeps the cache
    itself: `keys` and `values` are None, and a decoder runs one stream at a time (the server runs
    each model on one worker thread)."""

    backend = "llama.cpp"

    def __init__(self, model_dir: str | Path, max_context: int = LMCompileConfig.max_context, threads: int = 1):
        import llama_cpp

        from canao.lm.gguf import exported_gguf, open_llama_cpp

        gguf = exported_gguf(model_dir)
        if gguf is None:
            raise FileNotFoundError(f"{model_dir}: no GGUF export (canao export-gguf --model {model_dir} writes it)")
        self._logits_ith = llama_cpp.llama_get_logits_ith
        self.llm = open_llama_cpp(gguf, max_context, threads)
        self.tokenizer = lm_model.load_tokenizer(model_dir)
        self.eos_token_ids = lm_model.saved_eos_token_ids(model_dir, self.tokenizer)
        self.max_context = self.prefill_len = max_context
        self.pads_chunks = False

    def empty_cache(self):
        self.llm.reset()
        return None, None

    def __call__(self, tokens: np.ndarray, start: int, last: int, keys, values):
        self.llm.n_tokens = start  # eval drops llama.cpp's cached positions from here on
        self.llm.eval(tokens[0, : last + 1].tolist())
        logits = np.ctypeslib.as_array(self._logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        return logits.copy(), keys, values


def open_decoder(path: str | Path, max_context: int = LMCompileConfig.max_context, backend: str = "auto",
                 threads: int = 1):
    """A compiled artifact (manifest of stage compile-lm) as a TVMDecoder, a `litert_steps` directory as a
    LiteRTDecoder, any other model directory, with a cache of `max_context` positions, as
    `backend` says: "llama.cpp" (its GGUF export, `threads` threads), "torch", or "auto" (llama.cpp
    where the directory has a GGUF export, else PyTorch)."""
    if backend not in LM_DIR_BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(LM_DIR_BACKENDS)}")
    if (Path(path) / LITERT_STEPS_FILE).is_file():
        return LiteRTDecoder(path)
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("stage") == "compile-lm":
        return TVMDecoder(path)
    from canao.lm.gguf import exported_gguf

    if backend == "llama.cpp" or (backend == "auto" and exported_gguf(path) is not None):
        return LlamaCppDecoder(path, max_context, threads)
    return TorchDecoder(path, max_context)


def max_new_tokens_cap(decoder) -> int:
    return decoder.max_context - 1


def fit_prompt(prompt_ids: list[int], max_new_tokens: int, decoder) -> tuple[list[int], int]:
    """The prompt cut to fit the cache beside `max_new_tokens`, from the left (the end of a
    prompt matters most for what comes next); returns it and how many tokens were dropped."""
    if not prompt_ids:
        raise ValueError("prompt: empty; give at least one token of text")
    cap = max_new_tokens_cap(decoder)
    if not 1 <= max_new_tokens <= cap:
        raise ValueError(f"max_new_tokens: must be in [1, {cap}] (the context window holds {decoder.max_context} "
                         f"tokens, prompt included), got {max_new_tokens}")
    room = decoder.max_context - max_new_tokens
    return prompt_ids[-room:], max(0, len(prompt_ids) - room)


def stream(decoder, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
           stop_at_eos: bool = True) -> Iterator[tuple[int, float]]:
    """Generate after `prompt_ids` (which must fit: see fit_prompt): yields (token id, ms since the
    first prefill call) for each new token, ending after an EOS token (if `stop_at_eos`) or
    `max_new_tokens` tokens."""
    if not prompt_ids:
        raise ValueError("prompt: empty; give at least one token of text")
    if len(prompt_ids) + max_new_tokens > decoder.max_context:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                         f"context window ({decoder.max_context}); cut the prompt with fit_prompt")
    rng = np.random.default_rng(sampling.seed)
    keys, values = decoder.empty_cache()
    started = time.perf_counter()
    for begin in range(0, len(prompt_ids), decoder.prefill_len):
        chunk = prompt_ids[begin : begin + decoder.prefill_len]
        tokens = np.zeros((1, decoder.prefill_len if decoder.pads_chunks else len(chunk)), np.int64)
        tokens[0, : len(chunk)] = chunk
        logits, keys, values = decoder(tokens, begin, len(chunk) - 1, keys, values)
    position = len(prompt_ids)
    for produced in range(1, max_new_tokens + 1):
        token = sample(logits, sampling, rng)
        yield token, (time.perf_counter() - started) * 1000
        if produced == max_new_tokens or (stop_at_eos and token in decoder.eos_token_ids):
            return
        logits, keys, values = decoder(np.array([[token]], np.int64), position, 0, keys, values)
        position += 1


def with_text(tokenizer, tokens: Iterable[tuple[int, float]]) -> Iterator[tuple[int, float, str]]:
    """`stream`'s (token id, ms) with the text each token adds. The whole output is decoded each
    time: a character may span tokens, so a token decoded alone could be garbled; a token whose
    text does not extend what was shown adds "" (its text comes with a later token)."""
    generated, shown = [], ""
    for token, ms in tokens:
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        added = text[len(shown) :] if text.startswith(shown) else ""
        shown += added
        yield token, ms, added


# Stands for the user's text while the chat template is rendered (a private-use character no
# template writes), so the template's own markup and the user's text are tokenized apart.
USER_TEXT = "\ue000"


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of `prompt`, wrapped as one user turn of the tokenizer's chat template if `chat`
    (and the tokenizer has one). The prompt is always text: a control token written in it
    (`<|im_start|>`, `<|im_end|>`) becomes the tokens of those characters, never the control
    token, so a user cannot open a system turn or end their own."""
    if not prompt.strip():
        raise ValueError("prompt: empty; give some text")
    text = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True).input_ids
    if not (chat and tokenizer.chat_template):
        return text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": USER_TEXT}], add_generation_prompt=True,
                                             tokenize=False)
    before, after = rendered.split(USER_TEXT)
    return (tokenizer(before, add_special_tokens=False).input_ids + text
            + tokenizer(after, add_special_tokens=False).input_ids)


def timings(times_ms: list[float]) -> dict:
    """Time to first token and mean ms per token after it, from `stream`'s times."""
    if not times_ms:
        return {"time_to_first_token_ms": None, "ms_per_token": None, "new_tokens": 0}
    per_token = (times_ms[-1] - times_ms[0]) / (len(times_ms) - 1) if len(times_ms) > 1 else None
    return {"time_to_first_token_ms": times_ms[0], "ms_per_token": per_token, "new_tokens": len(times_ms)}
