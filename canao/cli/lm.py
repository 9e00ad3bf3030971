"""The generation family's subcommands: lm-teacher, lm-data, distill-lm, latency-lm,
search-lm, finalize-lm, eval-lm, compile-lm, export-gguf, generate, bench-lm.

Each command imports its stage's module when it runs, not at the top: together the stages
import torch, transformers, TVM, Optuna and MLflow, seconds that every `canao` call (a
`--help`, `canao services up`) would otherwise pay.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from canao import hardware
from canao.cli.common import add_config_args
from canao.config import LM_DIR_BACKENDS
from canao.lab import devices
from canao.lm.config import GEN_BACKENDS, GGUF_PRECISIONS, LMCompileConfig
from canao.profiles import load_config


def cmd_lm_teacher(args) -> None:
    from canao.lm.teacher import save_teacher

    cfg = load_config("lm-teacher", args.profile, args.config, args.overrides)
    manifest = save_teacher(cfg, args.out)
    print(json.dumps({"model": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_lm_data(args) -> None:
    from canao.lm.data import build_corpus

    cfg = load_config("lm-data", args.profile, args.config, args.overrides)
    manifest = build_corpus(cfg, args.out)
    print(json.dumps({"out": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_distill_lm(args) -> None:
    from canao.lm.distill import train_decoder_supernet

    cfg = load_config("distill-lm", args.profile, args.config, args.overrides)
    manifest = train_decoder_supernet(cfg, args.teacher, args.data, args.out)
    print(json.dumps({"supernet": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_latency_lm(args) -> None:
    from canao.lm.latency import fit_decoder_latency_model

    cfg = load_config("latency-lm", args.profile, args.config, args.overrides)
    manifest = fit_decoder_latency_model(cfg, devices.get_device(args.device), args.out, args.teacher)
    print(json.dumps({"latency_model": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_search_lm(args) -> None:
    from canao.codesign.pareto import FRONT_JSON, FRONT_PNG
    from canao.lm.search import search_lm

    cfg = load_config("search-lm", args.profile, args.config, args.overrides)
    manifest = search_lm(cfg, args.supernet, args.latency, args.out)
    out = Path(args.out).resolve()
    print(json.dumps({"front": str(out / FRONT_JSON), "plot": str(out / FRONT_PNG), **manifest["metrics"]}))


def cmd_finalize_lm(args) -> None:
    from canao.lm.finalize import finalize_student

    cfg = load_config("finalize-lm", args.profile, args.config, args.overrides)
    manifest = finalize_student(cfg, args.supernet, args.search, args.out)
    m = manifest["metrics"]
    keys = ("subnet", "perplexity", "teacher_perplexity", "perplexity_vs_teacher", "greedy_agreement", "top1_agreement",
            "predicted_ms_per_token", "measured_ms_per_token", "predicted_time_to_first_token_ms",
            "measured_time_to_first_token_ms")
    print(json.dumps({"model": str(Path(args.out).resolve()), **{k: m[k] for k in keys}}))


def cmd_eval_lm(args) -> None:
    from canao.lm.data import perplexity, read_text_file
    from canao.lm.gguf import gguf_model
    from canao.lm.model import load_causal_lm, load_tokenizer

    text = read_text_file(args.data)
    threads = hardware.torch_threads(args.threads)
    model = load_causal_lm(args.model) if args.backend == "torch" else gguf_model(args.model, threads)
    result = perplexity(model, load_tokenizer(args.model), text, args.max_tokens)
    print(json.dumps({"perplexity": round(result["perplexity"], 4), "tokens": result["tokens"],
                      "backend": args.backend}))


def cmd_compile_lm(args) -> None:
    from canao.lm.compile import compile_lm

    overrides = [*args.overrides] + ([f"trials={args.trials}"] if args.trials is not None else [])
    cfg = load_config("compile-lm", args.profile, args.config, overrides)
    manifest = compile_lm(args.model, devices.get_device(args.device), cfg, args.out)
    print(json.dumps({"out": str(Path(args.out).resolve()), "backends": manifest["backends"], **manifest["metrics"]}))


def cmd_export_gguf(args) -> None:
    from canao.lm.gguf import GGUF_FILE, export_gguf

    out = export_gguf(args.model, args.out or Path(args.model) / GGUF_FILE, args.precision)
    print(json.dumps({"out": str(out.resolve()), "bytes": out.stat().st_size, "precision": args.precision}))


def cmd_generate(args) -> None:
    from canao.lm import generator

    sampling = generator.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    threads = hardware.torch_threads(args.threads)
    decoder = generator.open_decoder(args.model, args.max_context, args.backend, threads)
    ids = generator.encode_prompt(decoder.tokenizer, args.prompt, chat=not args.no_chat)
    ids, dropped = generator.fit_prompt(ids, args.max_new_tokens, decoder)
    if dropped:
        print(f"canao generate: prompt truncated from the left: kept its last {len(ids)} tokens, dropped {dropped} "
              f"(context window {decoder.max_context} tokens, {args.max_new_tokens} reserved for new ones)",
              file=sys.stderr)
    times = []
    for _, ms, text in generator.with_text(decoder.tokenizer, generator.stream(decoder, ids, args.max_new_tokens,
                                                                            sampling)):
        times.append(ms)
        print(text, end="", flush=True)
    print()
    stats = generator.timings(times)
    print(json.dumps({"backend": decoder.backend, "prompt_tokens": len(ids), **{
        k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()}}), file=sys.stderr)


def cmd_bench_lm(args) -> None:
    from canao.lm.bench import bench_generation, generation_table
    from canao.manifest import write_records

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    cfg = load_config("bench-lm", args.profile, args.config, args.overrides)
    records = []
    for device_key in [args.device] if args.device else cfg.devices:
        records += bench_generation(args.model, args.artifact, devices.get_device(device_key), backends, cfg,
                                    load_config("compile-lm", args.profile))
    write_records(records, args.out)
    print(generation_table(records))


def register(sub) -> None:
    """The generation family's subcommands on `sub` (the parser's subparsers)."""
    p = sub.add_parser("lm-teacher", help="the generation teacher (SmolLM2-135M-Instruct, or a random tiny decoder)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="model directory to write")
    p.set_defaults(func=cmd_lm_teacher)

    p = sub.add_parser("lm-data", help="the LM corpus: train.txt and the held-out heldout.txt")
    add_config_args(p)
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=cmd_lm_data)

    p = sub.add_parser("distill-lm", help="the elastic decoder supernet, distilled from the generation teacher")
    add_config_args(p)
    p.add_argument("--teacher", required=True, help="a `canao lm-teacher` output")
    p.add_argument("--data", required=True, help="a `canao lm-data` output (train.txt trains, heldout.txt scores)")
    p.add_argument("--out", required=True, help="supernet directory to write")
    p.set_defaults(func=cmd_distill_lm)

    p = sub.add_parser("latency-lm", help="fit a local device's decode latency models (ms per token, time to first "
                                         "token) on compiled subnets")
    add_config_args(p)
    p.add_argument("--teacher", required=True, help="the generation teacher's directory; only its shape is used")
    p.add_argument("--device", required=True, help="a local device key from device_lab/devices.yaml")
    p.add_argument("--out", required=True, help="latency model directory to write")
    p.set_defaults(func=cmd_latency_lm)

    p = sub.add_parser("search-lm", help="NSGA-II search: the perplexity / latency front, ms per token or time to "
                                        "first token by `objective` (front.json, .png)")
    add_config_args(p)
    p.add_argument("--supernet", required=True, help="a `canao distill-lm` output")
    p.add_argument("--latency", required=True, help="a `canao latency-lm` output (its device is the search's)")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=cmd_search_lm)

    p = sub.add_parser("finalize-lm", help="extract the generation search's chosen subnet and fine-tune it by KD")
    add_config_args(p)
    p.add_argument("--supernet", required=True, help="a `canao distill-lm` output")
    p.add_argument("--search", required=True, help="a `canao search-lm` output")
    p.add_argument("--out", required=True, help="student model directory to write")
    p.set_defaults(func=cmd_finalize_lm)

    p = sub.add_parser("eval-lm", help="perplexity of a decoder on a text file (one protocol for all models)")
    p.add_argument("--model", required=True, help="model directory (save_pretrained layout)")
    p.add_argument("--data", required=True, help="UTF-8 text file, e.g. the heldout.txt of `canao lm-data`")
    p.add_argument("--max-tokens", type=int, default=0, help="score the first N tokens only (0: all)")
    p.add_argument("--backend", choices=[b for b in LM_DIR_BACKENDS if b != "auto"], default="torch",
                   help="PyTorch on the weights, or llama.cpp on the directory's GGUF export (its own numbers)")
    p.add_argument("--threads", type=int, default=0, help="torch or llama.cpp threads (0: all cores)")
    p.set_defaults(func=cmd_eval_lm)

    p = sub.add_parser("compile-lm", help="compile a decoder's prefill and decode steps with TVM for a device")
    add_config_args(p)
    p.add_argument("--model", required=True, help="model directory (save_pretrained layout)")
    p.add_argument("--device", required=True, help="device key from device_lab/devices.yaml")
    p.add_argument("--trials", type=int, help="MetaSchedule trials for kernels not yet tuned (default: profile's)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.set_defaults(func=cmd_compile_lm)

    p = sub.add_parser("export-gguf", help="a decoder as a GGUF file for llama.cpp (the teacher file's tokenizer)")
    p.add_argument("--model", required=True, help="model directory (save_pretrained layout)")
    p.add_argument("--precision", choices=GGUF_PRECISIONS, default="teacher",
                   help="teacher: stored as the teacher GGUF stores each tensor (Q4_1 matmuls); f32: float32; "
                        "q8_0, q4_0: every matrix in that format (q4_0: llama.cpp repacks it for its fastest kernels); "
                        "q4_0-q8_0-embd: q4_0 but the tied embedding and output matrix in q8_0")
    p.add_argument("--out", help="GGUF file to write (default: <model>/model.gguf, which bench-lm's llama.cpp runs)")
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("generate", help="generate text, streamed, then ms/token and time to first token")
    p.add_argument("--model", required=True, help="a `canao compile-lm` artifact (TVM) or a model directory (PyTorch)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after N tokens (or at EOS)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens of mass p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-chat", action="store_true", help="continue the prompt as raw text, no chat template")
    p.add_argument("--max-context", type=int, default=LMCompileConfig.max_context,
                   help="context window of a model directory (a compiled artifact has its own)")
    p.add_argument("--backend", choices=LM_DIR_BACKENDS, default="auto",
                   help="how a model directory runs: llama.cpp on its GGUF export, PyTorch, or auto (llama.cpp "
                        "where it has one)")
    p.add_argument("--threads", type=int, default=0, help="torch or llama.cpp threads (0: all cores)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench-lm", help="time generation: TVM, PyTorch and llama.cpp on the teacher GGUF")
    add_config_args(p)
    p.add_argument("--model", help="model directory (the torch backend)")
    p.add_argument("--artifact", help="a `canao compile-lm` output (the tvm backend)")
    p.add_argument("--device", help="one device key (default: the profile's devices)")
    p.add_argument("--backends", default=",".join(GEN_BACKENDS), help="comma-separated")
    p.add_argument("--out", required=True, help="JSON records to write")
    p.set_defaults(func=cmd_bench_lm)
