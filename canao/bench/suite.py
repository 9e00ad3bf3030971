"""`make bench`: the suite of models, lengths, devices and backends behind BENCHMARKS.md, and
the Markdown sections other commands write into it (search report, serving load test).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from canao import hardware
from canao.compile.relax import compiled
from canao.config import resolve_path
from canao.lab.devices import get_device
from canao.lm.bench import GenRecord, bench_generation, generation_table
from canao.lm.compile import compile_lm
from canao.lm.config import GEN_BACKENDS
from canao.lm.data import HELDOUT_FILE, build_corpus, perplexity, read_text_file
from canao.lm.gguf import exported_gguf
from canao.lm.model import load_causal_lm
from canao.lm.model import load_tokenizer as load_lm_tokenizer
from canao.lm.teacher import save_teacher
from canao.manifest import read_manifest, write_records, write_text_atomic
from canao.profiles import load_config
from canao.qa.bench import BACKENDS, bench, table
from canao.qa.compile import compile_model
from canao.qa.config import BertShape
from canao.qa.model import init_qa_model, load_tokenizer

SERVING_SECTION = "## Serving load test"  # written by `canao loadtest --benchmarks`, kept by bench-suite
GENERATION_SERVING_SECTION = "## Generation serving load test"  # ... by `canao loadtest --lm-model ... --benchmarks`
SEARCH_SECTION = "## CANAO search and student"  # written by `canao search-report`, kept by bench-suite
TRAINING_SECTION = "## Distillation throughput"  # written by `canao bench-kd --benchmarks`, kept by bench-suite
STUDENTS_SECTION = "## Which students"  # written by `canao bench-students --benchmarks`, kept by bench-suite
# ... and the same study given --supernet: does the search's accuracy proxy rank the candidates as KD does?
PROXY_SECTION = "## Does the search's proxy rank students truly"
GENERATION_SECTION = "## Text generation"  # written by bench-suite, alone with --generation-only


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
        for device in map(get_device, bench_cfg.devices):
            for seq_len in bench_cfg.seq_lens:
                compile_cfg = load_config("compile", profile, overrides=[f"seq_len={seq_len}"])
                artifact = compiled(model_dir, device, compile_cfg, compile_model)
                manifest = read_manifest(artifact)
                done = manifest["metrics"]["tuning"]
                tuning.append(f"| {device.key} | {seq_len} | {done['tasks']} | {done['tasks_reused']} | "
                              f"{compile_cfg.trials} | {compile_cfg.max_trials_per_task} | {done['seconds']:.0f} |")
                records += bench(artifact, model_dir, device, BACKENDS, bench_cfg)
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
    # The serving, search and training figures come from their own commands; a re-run of the suite keeps them.
    document = out.read_text() if out.is_file() else ""
    kept = [section for heading in (SEARCH_SECTION, PROXY_SECTION, STUDENTS_SECTION, TRAINING_SECTION, SERVING_SECTION,
                                    GENERATION_SERVING_SECTION)
            if (section := markdown_section(document, heading))]
    write_text_atomic(out, header + "\n" + "\n\n".join(sections) + f"\n\n{GENERATION_SECTION}\n\n{generation}\n"
                      + "".join(f"\n{section}" for section in kept))
    write_records(raw + gen_records, out.with_suffix(".json"))


def suite_lm_inputs(teacher_dir: Path, data_dir: Path, profile: str) -> tuple[Path, Path]:
    """(generation teacher directory, held-out text file): the given ones where they exist, else
    made with the profile's lm-teacher and lm-data configs under outputs/bench-models/."""
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
    model's held-out perplexity (one protocol, canao.lm.data). Markdown (the section's body,
    `command` named in it) and the records."""
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
        records[name] = [r for device in map(get_device, cfg.devices) for r in bench_generation(
            model_dir, compiled(model_dir, device, compile_cfg, compile_lm), device, backends, cfg, compile_cfg)]
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
