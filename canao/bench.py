"""One benchmark protocol for every backend: warm-up, repeated timed runs, p50/p90/min.

The TVM module runs on the device through the lab's tracker (`time_evaluator` on the
device server, pinned to the device's cores with its thread count). The peers (LiteRT,
ONNX Runtime, PyTorch) run on this machine in a fresh process pinned to the same cores
with the same thread count, so every backend gets the same hardware. Inputs are the same
deterministic windows for all, and every record carries its numerics difference from
PyTorch fp32.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import multiprocessing
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from canao import device_lab, hardware
from canao.config import (
    GEN_BACKENDS,
    BenchConfig,
    BertShape,
    CompileConfig,
    GenBenchConfig,
    LMCompileConfig,
    config_hash,
    load_config,
    resolve_path,
)
from canao.manifest import read_manifest, sha256_file, verify_manifest, write_text_atomic
from canao.models.bert_qa import example_inputs, init_qa_model, load_tokenizer

BACKENDS = ("tvm", "litert", "litert-int8", "onnxruntime", "onnxruntime-int8", "torch")
SERVING_SECTION = "## Serving load test"  # written by `canao loadtest --benchmarks`, kept by bench-suite
SEARCH_SECTION = "## CANAO search and student"  # written by `canao search-report`, kept by bench-suite
GENERATION_SECTION = "## Text generation"  # written by bench-suite, alone with --generation-only
BASELINE = "litert"  # speedups are relative to LiteRT fp32, the strongest fp32 peer on CPUs
COMPILED_DIR = "outputs/compiled"  # compiled artifacts by device and content hash, relative to the project root


@dataclass(frozen=True)
class Record:
    backend: str
    device: str
    seq_len: int
    p50_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    threads: int
    cores: tuple[int, ...]
    version: str  # backend version string
    numerics_max_abs_diff: float  # max |start/end logits - PyTorch fp32|
    hardware: str  # canao.hardware.Hardware.label() of the device: which CPU the figure comes from


def summarize(times_ms: list[float]) -> dict:
    t = np.asarray(times_ms)
    return {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min())}


def _time_peer(backend: str, path: str, device_key: str, warmup: int, runs: int, seq_len: int) -> tuple[list, str]:
    """In a child process: pin to the device's cores, then time the peer runtime."""
    from canao import peers

    device = device_lab.get_device(device_key)
    device_lab.pin(device)
    runner = peers.runner(backend, Path(path), threads=device.threads)
    return time_calls(runner, [t.numpy() for t in example_inputs(seq_len)], warmup, runs), runner.version


def time_calls(runner, inputs: list, warmup: int, runs: int) -> list[float]:
    """Milliseconds of each of `runs` calls runner(*inputs), after `warmup` untimed ones."""
    for _ in range(warmup):
        runner(*inputs)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        runner(*inputs)
        times.append((time.perf_counter() - started) * 1000)
    return times


def bench(artifact_dir: str | Path, model_dir: str | Path, device_key: str, backends: tuple[str, ...],
          cfg: BenchConfig) -> list[Record]:
    """Time `backends` of a compiled artifact directory on `device_key`."""
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    device = device_lab.get_device(device_key)
    artifact_dir = Path(artifact_dir)
    manifest = verify_manifest(artifact_dir)
    if manifest["config"]["device"] != device.key:
        raise ValueError(f"{artifact_dir}: compiled for {manifest['config']['device']}, not for {device.key}")
    missing = sorted(set(backends) - set(manifest["backends"]) - {"torch"})
    if missing:
        raise ValueError(f"{artifact_dir}: has no {', '.join(missing)} export (compile it with those peers)")
    seq_len = manifest["config"]["seq_len"]
    numerics = manifest["metrics"]["numerics_max_abs_diff"]
    records = []
    for backend in backends:
        if backend == "tvm":
            inputs = [t.numpy() for t in example_inputs(seq_len)]
            times = device_lab.time_remote(artifact_dir / manifest["backends"]["tvm"], inputs, device.key,
                                           cfg.warmup, cfg.runs)
            version = _tvm_version()
        else:
            path = Path(model_dir) if backend == "torch" else artifact_dir / manifest["backends"][backend]
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(1) as pool:
                times, version = pool.apply(_time_peer, (backend, str(path), device.key, cfg.warmup, cfg.runs,
                                                         seq_len))
        records.append(Record(
            backend=backend, device=device.key, seq_len=seq_len, runs=len(times), threads=device.threads,
            cores=tuple(device.cores), version=version, numerics_max_abs_diff=numerics.get(backend, 0.0),
            hardware=device.hardware().label(), **summarize(times),
        ))
    return records


def _tvm_version() -> str:
    import tvm

    return f"tvm {tvm.__version__}"


def compiled(model_dir: str | Path, device_key: str, cfg: CompileConfig | LMCompileConfig) -> Path:
    """The compiled artifact of `model_dir` for `device_key` under `cfg` (a QA model's compile
    config, or a decoder's compile-lm config), compiled on first use and kept in
    outputs/compiled/<device>/<weights, config and hardware hash>/ for later runs on that hardware."""
    from canao.compile import compile_lm, compile_model

    model_dir = Path(model_dir)
    fingerprint = sha256_file(model_dir / "model.safetensors") + config_hash(cfg)
    key = hashlib.sha256((fingerprint + device_lab.get_device(device_key).hardware().fingerprint()).encode()
                         ).hexdigest()[:16]
    out = resolve_path(COMPILED_DIR) / device_key / key
    if read_manifest(out) is None:
        (compile_lm if isinstance(cfg, LMCompileConfig) else compile_model)(model_dir, device_key, cfg, out)
    return out


def table(records: list[Record]) -> str:
    """Markdown table with each backend's speedup over LiteRT fp32 on the same device and length."""
    base = {(r.device, r.seq_len): r.p50_ms for r in records if r.backend == BASELINE}
    lines = ["| device | seq | backend | p50 ms | p90 ms | min ms | vs LiteRT fp32 | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        ref = base.get((r.device, r.seq_len))
        speedup = f"{ref / r.p50_ms:.2f}x" if ref else "n/a"
        lines.append(f"| {r.device} | {r.seq_len} | {r.backend} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | "
                     f"{r.min_ms:.2f} | {speedup} | {r.numerics_max_abs_diff:.1e} |")
    return "\n".join(lines)


def write_records(records: list[Record] | list[GenRecord], path: str | Path, kept: list[dict] = ()) -> None:
    """Write atomically: a benchmark cut short leaves no file that looks complete. `kept`: records
    (as read back) of another run to write first."""
    write_text_atomic(path, json.dumps({"host": hardware.host().label(),
                                        "records": [*kept, *(asdict(r) for r in records)]}, indent=1))


# `make bench`: the models of the suite. The QA teacher's shape (all-MiniLM-L6-v2) and a
# smaller BERT; latency depends on the shape only, so the small one keeps random weights.
SMALL_BERT = BertShape(num_layers=4, hidden_size=256, num_heads=4, ffn_size=1024)
BENCH_MODELS_DIR = "outputs/bench-models"


def markdown_section(document: str, heading: str) -> str | None:
    """The section of `document` under the line `heading` (up to the next heading of the same or a
    higher level), heading line included; None if absent."""
    lines = document.splitlines()
    if heading not in lines:
        return None
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    return "\n".join(lines[start:end]).rstrip() + "\n"


def put_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the `heading` section of the Markdown file `path` with `body`."""
    document = path.read_text() if path.is_file() else ""
    section = f"{heading}\n\n{body.strip()}\n"
    old = markdown_section(document, heading)
    document = document.replace(old, section) if old else document.rstrip() + ("\n\n" if document else "") + section
    write_text_atomic(path, document)


def suite_models(teacher_dir: Path) -> dict[str, Path]:
    """Model name -> directory: the trained teacher if there is one (else MiniLM with an
    untrained span head: the same shape), and the small BERT."""
    root = resolve_path(BENCH_MODELS_DIR)
    models = {}
    if read_manifest(teacher_dir) is not None:
        models["QA teacher (all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, FFN 1536)"] = teacher_dir
    else:
        models["all-MiniLM-L6-v2 QA shape (6 layers, hidden 384, 12 heads, FFN 1536; untrained head)"] = (
            _saved(root / "minilm-qa", "minilm", BertShape()))
    models["small BERT (4 layers, hidden 256, 4 heads, FFN 1024; random weights)"] = (
        _saved(root / "small-bert", "random", SMALL_BERT))
    return models


def _saved(path: Path, init: str, shape: BertShape) -> Path:
    if not (path / "model.safetensors").is_file():
        init_qa_model(init, shape, seed=0).save_pretrained(path)
        load_tokenizer().save_pretrained(path)
    return path


def suite(teacher_dir: Path, profile: str, out: Path, command: str, lm_teacher_dir: Path, lm_data_dir: Path,
          lm_student_dir: Path | None = None, generation_only: bool = False) -> None:
    """Every suite model at every length on every device, all backends, then the generation
    table (`generation_suite`); writes `out` (Markdown) and its records beside it (.json). With
    `generation_only`, the generation section and its records alone are replaced; the rest stays."""
    generation, gen_records = generation_suite(*suite_lm_inputs(lm_teacher_dir, lm_data_dir, profile),
                                               lm_student_dir, profile, command)
    if generation_only:
        put_section(out, GENERATION_SECTION, generation)
        records = out.with_suffix(".json")
        kept = [r for r in json.loads(records.read_text())["records"] if "ms_per_token" not in r] \
            if records.is_file() else []
        write_records(gen_records, records, kept)
        return
    bench_cfg = load_config("bench", profile)
    sections, raw = [], []
    for name, model_dir in suite_models(teacher_dir).items():
        records, tuning = [], []
        for device_key in bench_cfg.devices:
            for seq_len in bench_cfg.seq_lens:
                compile_cfg = load_config("compile", profile, overrides=[f"seq_len={seq_len}"])
                artifact = compiled(model_dir, device_key, compile_cfg)
                manifest = read_manifest(artifact)
                done = manifest["metrics"]["tuning"]
                tuning.append(f"| {device_key} | {seq_len} | {done['tasks']} | {done['tasks_reused']} | "
                              f"{compile_cfg.trials} | {compile_cfg.max_trials_per_task} | {done['seconds']:.0f} |")
                records += bench(artifact, model_dir, device_key, BACKENDS, bench_cfg)
        raw += records
        sections.append(f"### {name}\n\n{table(records)}\n\nTVM tuning behind these numbers "
                        "(kernels of one shape are tuned once per device and reused):\n\n"
                        "| device | seq | kernels | reused from the database | trial budget | max trials per kernel "
                        "| tuning s |\n|---|---|---|---|---|---|---|\n" + "\n".join(tuning))
    header = (f"# Benchmarks\n\nGenerated by `{command}` on {datetime.date.today().isoformat()}, "
              f"hardware: {hardware.host().label()}. Batch 1; p50/p90/min over {bench_cfg.runs} timed runs after "
              f"{bench_cfg.warmup} warm-up runs. TVM runs on the device-lab server of each device "
              "(tracker on 127.0.0.1); the peers run pinned to the same cores with the same thread count. "
              "`vs LiteRT fp32` is LiteRT fp32's p50 divided by the backend's p50 on the same device and "
              "length; `max abs diff` is against PyTorch fp32 start/end logits.\n")
    # The serving and search figures come from their own commands; a re-run of the suite keeps them.
    document = out.read_text() if out.is_file() else ""
    kept = [section for heading in (SEARCH_SECTION, SERVING_SECTION)
            if (section := markdown_section(document, heading))]
    write_text_atomic(out, header + "\n" + "\n\n".join(sections) + f"\n\n{GENERATION_SECTION}\n\n{generation}\n"
                      + "".join(f"\n{section}" for section in kept))
    write_records(raw + gen_records, out.with_suffix(".json"))


# ---- text generation ----------------------------------------------------------------------------


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


def _time_generation(backend: str, path: str, device_key: str, contexts: tuple[int, ...], new_tokens: int,
                     repeats: int) -> tuple[dict, str]:
    """In a child process pinned to the device: {context: [(ttft ms, ms/token) per repeat]} and the version."""
    from canao.apps.generate import timings

    device = device_lab.get_device(device_key)
    device_lab.pin(device)
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
        from canao.apps.generate import LiteRTDecoder, TVMDecoder, stream

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

        from canao.models.llama_lm import load_causal_lm

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


def bench_generation(model_dir: str | Path | None, artifact_dir: str | Path | None, device_key: str,
                     backends: tuple[str, ...], cfg: GenBenchConfig, step_cfg: LMCompileConfig | None = None,
                     litert_root: str | Path | None = None) -> list[GenRecord]:
    """Time greedy generation at each of `cfg.contexts` on `device_key` (a local device: every
    backend runs here, pinned to its cores with its thread count): `tvm` runs the compile-lm
    artifact, `torch` the model directory with transformers' generate, `llama.cpp` the model
    directory's GGUF export (canao.models.gguf_export) if it has one, else the teacher's GGUF file
    (the issue's peer: llama.cpp on the very file the teacher comes from), `litert` the model
    directory's KV-cache steps converted to LiteRT with `step_cfg`'s cache (the TVM artifact's
    shape, so the two compiled runtimes do the same work), kept under `litert_root` (default:
    canao.apps.generate.LITERT_STEPS_DIR)."""
    from canao.apps.generate import LITERT_STEPS_DIR, litert_steps
    from canao.models.gguf_export import exported_gguf
    from canao.models.llama_lm import teacher_gguf

    unknown = sorted(set(backends) - set(GEN_BACKENDS))
    if unknown:
        raise ValueError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(GEN_BACKENDS)})")
    device = device_lab.get_device(device_key)
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
        paths["litert"] = litert_steps(model_dir, step_cfg, litert_root or LITERT_STEPS_DIR)
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
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            results, version = pool.apply(_time_generation, (backend, str(paths[backend]), device.key, cfg.contexts,
                                                             cfg.new_tokens, cfg.repeats))
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


def suite_lm_inputs(teacher_dir: Path, data_dir: Path, profile: str) -> tuple[Path, Path]:
    """(generation teacher directory, held-out text file): the given ones where they exist, else
    made with the profile's lm-teacher and lm-data configs under outputs/bench-models/."""
    from canao.data.text import HELDOUT_FILE, build_corpus
    from canao.models.llama_lm import save_teacher

    root = resolve_path(BENCH_MODELS_DIR)
    if read_manifest(teacher_dir) is None:
        teacher_dir = root / f"lm-teacher-{profile}"
        if read_manifest(teacher_dir) is None:
            save_teacher(load_config("lm-teacher", profile), teacher_dir)
    if read_manifest(data_dir) is None:
        data_dir = root / f"lm-data-{profile}"
        if read_manifest(data_dir) is None:
            build_corpus(load_config("lm-data", profile), data_dir)
    return teacher_dir, data_dir / HELDOUT_FILE


def generation_suite(teacher_dir: Path, heldout_file: Path, student_dir: Path | None, profile: str, command: str
                     ) -> tuple[str, list[GenRecord]]:
    """`make bench`'s generation section: the teacher decoder in TVM (compile-lm, the profile's
    config), PyTorch, llama.cpp (its own GGUF file) and LiteRT, and the student (if given) in the
    same (llama.cpp only on its own GGUF export), at the profile's contexts on its devices; every
    model's held-out perplexity (one protocol, canao.data.text). Markdown (the section's body,
    `command` named in it) and the records."""
    from canao.data.text import perplexity, read_text_file
    from canao.models.gguf_export import exported_gguf
    from canao.models.llama_lm import load_causal_lm
    from canao.models.llama_lm import load_tokenizer as load_lm_tokenizer

    cfg, compile_cfg = load_config("bench-lm", profile), load_config("compile-lm", profile)
    heldout = read_text_file(heldout_file)
    models = {"teacher": teacher_dir} | ({"student": Path(student_dir)} if student_dir else {})
    records: dict[str, list[GenRecord]] = {}
    quality = ["| model | directory | parameters | held-out perplexity | tokens scored |", "|---|---|---|---|---|"]
    for name, model_dir in models.items():
        model = load_causal_lm(model_dir)
        scored = perplexity(model, load_lm_tokenizer(model_dir), heldout, cfg.perplexity_tokens, progress=False)
        quality.append(f"| {name} | {model_dir} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M | "
                       f"{scored['perplexity']:.2f} | {scored['tokens']} |")
        # llama.cpp runs a student only as its own GGUF export (finalize-lm writes one).
        has_gguf = name == "teacher" or exported_gguf(model_dir) is not None
        backends = tuple(b for b in GEN_BACKENDS if has_gguf or b != "llama.cpp")
        records[name] = [r for device_key in cfg.devices for r in bench_generation(
            model_dir, compiled(model_dir, device_key, compile_cfg), device_key, backends, cfg, compile_cfg)]
    peer = [r for r in records["teacher"] if r.backend == "llama.cpp"]
    sections = [f"### Generation: {name}\n\n{generation_table(rows, None if name == 'teacher' else peer)}"
                for name, rows in records.items()]
    if student_dir is None:
        sections.append("No student given (`canao bench-suite --lm-student DIR`): the teacher only.")
    intro = (f"Generated by `{command}` on {datetime.date.today().isoformat()}, hardware: {hardware.host().label()}. "
             f"Greedy decoding, EOS ignored: time to first token after a prompt of each "
             f"context length, then the mean ms per token of {cfg.new_tokens} tokens; medians over {cfg.repeats} "
             f"runs. TVM runs the compile-lm artifact ({compile_cfg.max_context}-token KV cache, "
             f"{compile_cfg.trials} tuning trials); LiteRT runs the same KV-cache steps converted by litert-torch "
             f"(float32, the same cache); llama.cpp runs the teacher's own GGUF file (Q4_1) and a "
             f"student's GGUF export at the teacher file's precision; `vs llama.cpp on the teacher` is llama.cpp's "
             f"ms/token on the teacher's file divided by the row's. Perplexity: held-out "
             f"text ({heldout_file.name}) under one protocol for every model.\n\n" + "\n".join(quality))
    return intro + "\n\n" + "\n\n".join(sections), [r for rows in records.values() for r in rows]
