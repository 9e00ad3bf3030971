"""The generation benchmark: greedy decoding timed in every backend (TVM, PyTorch, llama.cpp,
LiteRT) on a local device, each in a fresh process pinned to the device's cores: time to
first token after a prompt of each context length, then ms per token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from canao.lab import devices
from canao.lab.devices import Device
from canao.lm.config import GEN_BACKENDS, GenBenchConfig, LMCompileConfig
from canao.lm.generator import LiteRTDecoder, TVMDecoder, litert_steps, stream, timings
from canao.lm.gguf import exported_gguf
from canao.lm.model import load_causal_lm
from canao.lm.teacher import teacher_gguf
from canao.manifest import verify_manifest
from canao.processes import call_in_child


@dataclass(frozen=True)
class GenRecord:
    backend: str
    model: str  # what ran: the model directory, the compiled artifact, or the teacher GGUF (llama.cpp)
    device: str
    context: int  # prompt tokens before the first generated token
    new_tokens: int  # tokens generated per measurement (greedy; EOS does not stop it)
    time_to_first_token_ms: float  # median over repeats: prompt processing + first token
    ms_per_token: float  # median over repeats of the mean time of each token after the first
    repeats: int
    threads: int
    cores: tuple[int, ...]
    version: str
    hardware: str  # canao.hardware.Hardware.label() of the device: which CPU the figure comes from


def gen_prompt(context: int, vocab_size: int) -> list[int]:
    """The same deterministic prompt of `context` token ids for every backend (latency does not
    depend on which tokens they are)."""
    return np.random.default_rng(0).integers(100, vocab_size, context).tolist()


def _time_generation(backend: str, path: str, device: Device, contexts: tuple[int, ...], new_tokens: int,
                     repeats: int) -> tuple[dict, str]:
    """In a child process pinned to the device: {context: [(ttft ms, ms/token) per repeat]} and the version."""
    devices.pin(device)
    generate_times, version, vocab = _generator(backend, Path(path), device.threads)
    results = {}
    for context in contexts:
        prompt = gen_prompt(context, vocab)
        generate_times(prompt, 2)  # warm-up: thread pools, allocations
        results[context] = []
        for _ in range(repeats):
            stats = timings(generate_times(prompt, new_tokens))
            results[context].append((stats["time_to_first_token_ms"], stats["ms_per_token"]))
    return results, version


def _generator(backend: str, path: Path, threads: int):
    """(generate_times(prompt ids, n) -> ms since start of each of n greedy tokens, version, vocab size)."""
    import time as clock

    if backend in ("tvm", "litert"):
        if backend == "tvm":
            import tvm

            decoder, version = TVMDecoder(path), f"tvm {tvm.__version__}"
        else:
            decoder = LiteRTDecoder(path, threads)
            version = f"litert {decoder.version} (float32, XNNPACK)"

        def step_times(prompt, n):
            return [ms for _, ms in stream(decoder, prompt, n, stop_at_eos=False)]

        return step_times, version, len(decoder.tokenizer)
    if backend == "torch":
        import torch
        from transformers.generation.streamers import BaseStreamer


        torch.set_num_threads(threads)
        model = load_causal_lm(path)

        class Clock(BaseStreamer):  # transformers hands the streamer the prompt first, then each new token
            def __init__(self):
                self.started, self.times, self.prompt_seen = clock.perf_counter(), [], False

            def put(self, value):
                if self.prompt_seen:
                    self.times.append((clock.perf_counter() - self.started) * 1000)
                self.prompt_seen = True

            def end(self):
                pass

        @torch.inference_mode()
        def torch_times(prompt, n):
            streamer = Clock()
            model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           streamer=streamer, pad_token_id=model.config.eos_token_id)
            return streamer.times

        return torch_times, f"torch {torch.__version__} eager, transformers DynamicCache", model.config.vocab_size
    if backend == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                              verbose=False)

        def llama_cpp_times(prompt, n):
            llm.reset()  # no reuse of the previous run's prompt cache: every run processes its whole prompt
            started, times = clock.perf_counter(), []
            for _ in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
                times.append((clock.perf_counter() - started) * 1000)
                if len(times) == n:
                    break
            return times

        return llama_cpp_times, f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", llm.n_vocab()
    raise ValueError(f"--backends: unknown {backend!r} (known: {', '.join(GEN_BACKENDS)})")


def bench_generation(model_dir: str | Path | None, artifact_dir: str | Path | None, device: Device,
                     backends: tuple[str, ...], cfg: GenBenchConfig, step_cfg: LMCompileConfig | None = None,
                     litert_root: str | Path | None = None) -> list[GenRecord]:
    """Time greedy generation at each of `cfg.contexts` on `device` (a local device: every
    backend runs here, pinned to its cores with its thread count): `tvm` runs the compile-lm
    artifact, `torch` the model directory with transformers' generate, `llama.cpp` the model
    directory's GGUF export (canao.lm.gguf) if it has one, else the teacher's GGUF file
    (the issue's peer: llama.cpp on the very file the teacher comes from), `litert` the model
    directory's KV-cache steps converted to LiteRT with `step_cfg`'s cache (the TVM artifact's
    shape, so the two compiled runtimes do the same work), kept under `litert_root` (default:
    canao.lm.generator.LITERT_STEPS_DIR)."""
    unknown = sorted(set(backends) - set(GEN_BACKENDS))
    if unknown:
        raise ValueError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(GEN_BACKENDS)})")
    if not device.local:
        raise ValueError(f"device {device.key}: generation is timed on this machine; pick a local device")
    if cfg.new_tokens < 2:
        raise ValueError(f"new_tokens: must be >= 2 (ms/token is measured after the first), got {cfg.new_tokens}")
    paths = {"llama.cpp": (model_dir is not None and exported_gguf(model_dir)) or teacher_gguf()}
    if "torch" in backends:
        if model_dir is None:
            raise ValueError("--model: needed for the torch backend")
        paths["torch"] = Path(model_dir)
    if "litert" in backends:
        if model_dir is None or step_cfg is None:
            raise ValueError("--model and the compile-lm config: needed for the litert backend")
        paths["litert"] = litert_steps(model_dir, step_cfg, litert_root)
    if "tvm" in backends:
        if artifact_dir is None:
            raise ValueError("--artifact: needed for the tvm backend (a `canao compile-lm` output)")
        manifest = verify_manifest(artifact_dir)
        if manifest["stage"] != "compile-lm" or manifest["config"]["device"] != device.key:
            raise ValueError(f"{artifact_dir}: not a compile-lm artifact for {device.key}")
        room = manifest["config"]["max_context"]
        if max(cfg.contexts) + cfg.new_tokens > room:
            raise ValueError(f"{artifact_dir}: its KV cache holds {room} tokens, fewer than context "
                             f"{max(cfg.contexts)} + {cfg.new_tokens} new tokens; compile with a larger max_context")
        paths["tvm"] = Path(artifact_dir)
    records = []
    for backend in backends:
        results, version = call_in_child(f"timing {backend}", _time_generation, backend, str(paths[backend]),
                                         device, cfg.contexts, cfg.new_tokens, cfg.repeats)
        for context, runs in results.items():
            ttft, per_token = np.median(np.asarray(runs), axis=0)
            records.append(GenRecord(
                backend=backend, model=str(paths[backend]), device=device.key, context=context,
                new_tokens=cfg.new_tokens, time_to_first_token_ms=float(ttft), ms_per_token=float(per_token),
                repeats=len(runs), threads=device.threads, cores=tuple(device.cores), version=version,
                hardware=device.hardware().label(),
            ))
    return records


def generation_table(records: list[GenRecord], peer: list[GenRecord] | None = None) -> str:
    """Markdown: each backend's ms/token and time to first token, and its speedup per token over
    llama.cpp: `peer`, llama.cpp on the teacher's GGUF, shown last (default: the llama.cpp rows of
    `records`, which are then the teacher's own)."""
    if peer is None:
        peer = [r for r in records if r.backend == "llama.cpp"]
    else:
        records = records + [replace(r, backend="llama.cpp, teacher GGUF") for r in peer]
    base = {(r.device, r.context): r.ms_per_token for r in peer}
    lines = ["| device | context | backend | ms/token | time to first token ms | vs llama.cpp on the teacher |",
             "|---|---|---|---|---|---|"]
    for r in records:
        ref = base.get((r.device, r.context))
        lines.append(f"| {r.device} | {r.context} | {r.backend} | {r.ms_per_token:.2f} | "
                     f"{r.time_to_first_token_ms:.1f} | {f'{ref / r.ms_per_token:.2f}x' if ref else 'n/a'} |")
    return "\n".join(lines)
