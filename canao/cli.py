"""`canao <command>`: every stage and tool from the command line.

Stage commands take `--profile tiny|quick|full` (configs/<profile>/<stage>.yaml) or
`--config FILE`, and `--set key=value` overrides (dotted keys for nested sections).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from canao import device_lab, hardware, registry, services
from canao.bench import BACKENDS, GEN_BACKENDS
from canao.config import (
    PROFILES,
    ConfigError,
    LMCompileConfig,
    SquadFeatureConfig,
    apply_overrides,
    from_dict,
    load_config,
    resolve_path,
    to_dict,
)
from canao.data.squad import SquadExample, SquadFormatError, load_squad
from canao.manifest import read_manifest, verify_manifest


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=PROFILES, default="quick", help="config profile (default: quick)")
    p.add_argument("--config", help="a config YAML instead of the profile's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=1 (repeatable)")


def cmd_teacher(args) -> None:
    from canao.distill import train_teacher

    cfg = load_config("teacher", args.profile, args.config, args.overrides)
    manifest = train_teacher(cfg, args.out)
    m = manifest["metrics"]
    print(json.dumps({"exact_match": round(m["exact_match"], 2), "f1": round(m["f1"], 2),
                      "questions": m["questions"], "model": str(Path(args.out).resolve())}))


def cmd_distill(args) -> None:
    from canao.distill import train_supernet

    cfg = load_config("distill", args.profile, args.config, args.overrides)
    manifest = train_supernet(cfg, _teacher(args), args.out)
    print(json.dumps({"supernet": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_latency(args) -> None:
    from canao.latency import fit_latency_model

    cfg = load_config("latency", args.profile, args.config, args.overrides)
    manifest = fit_latency_model(cfg, args.device, args.out, _teacher(args))
    print(json.dumps({"latency_model": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_search(args) -> None:
    from canao.search import FRONT_JSON, FRONT_PNG, search

    cfg = load_config("search", args.profile, args.config, args.overrides)
    manifest = search(cfg, args.supernet, args.latency, args.out)
    out = Path(args.out).resolve()
    print(json.dumps({"front": str(out / FRONT_JSON), "plot": str(out / FRONT_PNG), **manifest["metrics"]}))


def cmd_finalize(args) -> None:
    from canao.search import finalize

    cfg = load_config("finalize", args.profile, args.config, args.overrides)
    manifest = finalize(cfg, _teacher(args), args.supernet, args.search, args.out)
    m = manifest["metrics"]
    keys = ("exact_match", "f1", "teacher_f1", "f1_drop", "questions", "student_ms", "teacher_ms",
            "student_best_backend", "student_best_backend_f1", "speedup_vs_teacher_litert")
    print(json.dumps({"model": str(Path(args.out).resolve()), **{k: m[k] for k in keys if k in m}}))


def _teacher(args) -> str:
    return args.teacher or f"outputs/{args.profile}/teacher"


def _predictor(args):
    from canao.apps.qa import open_predictor

    model_dir = Path(args.model)
    manifest = read_manifest(model_dir) or {}
    if "backends" in manifest:  # a compiled artifact: what serving runs, at its compiled length
        if args.overrides:
            raise ValueError(f"--set: {model_dir} is a compiled artifact; its windowing is its compiled length")
        manifest = verify_manifest(model_dir)
    predictor, backend, _ = open_predictor(model_dir, manifest, args.backend, hardware.threads(args.threads),
                                           args.batch_size, "--backend")
    print(f"{model_dir}: backend {backend}", file=sys.stderr)
    if args.overrides:
        merged = apply_overrides(to_dict(predictor.features_cfg), args.overrides)
        predictor.features_cfg = from_dict(SquadFeatureConfig, merged, "features.")
    return predictor


def cmd_eval_qa(args) -> None:
    from canao.apps.qa import evaluate

    examples = load_squad(args.data, args.questions)
    metrics, predictions = evaluate(_predictor(args), examples)
    if args.out:
        Path(args.out).write_text(json.dumps({qid: p.text for qid, p in predictions.items()}, indent=1))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()}))


def cmd_qa(args) -> None:
    for name in ("context", "question"):
        if not getattr(args, name).strip():
            raise ValueError(f"--{name}: must not be empty")
    predictor = _predictor(args)
    example = SquadExample("cli", args.question, args.context, ())
    started = time.perf_counter()
    prediction = predictor.predict([example])["cli"]
    latency_ms = (time.perf_counter() - started) * 1000
    print(json.dumps({"answer": prediction.text, "score": round(prediction.probability, 4),
                      "start": prediction.start, "end": prediction.end, "latency_ms": round(latency_ms, 1)}))


def cmd_squad_score(args) -> None:
    from canao.data import squad_metric

    examples = load_squad(args.data)
    path = Path(args.predictions)
    try:
        predictions = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(predictions, dict):
        raise ValueError(f"{path}: expected an object of question id -> answer text")
    for qid, text in predictions.items():
        if not isinstance(text, str):
            raise ValueError(f"{path}: question id {qid!r}: answer must be a string, got {type(text).__name__}")
    scores = squad_metric.score(examples, predictions)
    if scores["missing"]:
        print(f"{path}: {scores['missing']} of {len(examples)} questions have no prediction; "
              "they are scored as wrong", file=sys.stderr)
    print(json.dumps({"exact_match": scores["exact_match"], "f1": scores["f1"]}))


def cmd_compile(args) -> None:
    from canao.compile import compile_model

    overrides = [*args.overrides, f"seq_len={args.seq_len}"]
    if args.trials is not None:
        overrides.append(f"trials={args.trials}")
    cfg = load_config("compile", args.profile, args.config, overrides)
    manifest = compile_model(args.model, args.device, cfg, args.out)
    print(json.dumps({"out": str(Path(args.out).resolve()), "backends": manifest["backends"], **manifest["metrics"]}))


def cmd_bench(args) -> None:
    from canao import bench

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    compile_cfg = load_config("compile", args.profile, None, [f"seq_len={args.seq_len}"])
    bench_cfg = load_config("bench", args.profile, args.config, args.overrides)
    artifact = args.artifact or bench.compiled(args.model, args.device, compile_cfg)
    records = bench.bench(artifact, args.model, args.device, backends, bench_cfg)
    bench.write_records(records, args.out)
    print(bench.table(records))


def cmd_bench_suite(args) -> None:
    from canao import bench

    student = f" --lm-student {args.lm_student}" if args.lm_student else ""
    only = " --generation-only" if args.generation_only else ""
    bench.suite(resolve_path(args.teacher), args.profile, Path(args.out),
                command=f"canao bench-suite --profile {args.profile}{only}{student} --out {args.out}",
                lm_teacher_dir=resolve_path(args.lm_teacher), lm_data_dir=resolve_path(args.lm_data),
                lm_student_dir=resolve_path(args.lm_student) if args.lm_student else None,
                generation_only=args.generation_only)


def cmd_serve(args) -> None:
    from canao.apps.serve import serve

    overrides = [*args.overrides, *(f"{k}={v}" for k, v in (("host", args.host), ("port", args.port)) if v)]
    serve(args.model, args.lm_model, load_config("serve", args.profile, args.config, overrides))


def cmd_loadtest(args) -> None:
    from canao.apps import loadtest

    cfg = load_config("loadtest", args.profile, args.config, args.overrides)
    if args.url:
        result = loadtest.run(args.url, cfg)
    else:
        with loadtest.spawned_server(args.model, args.profile, args.serve_overrides) as url:
            result = loadtest.run(url, cfg)
    table = loadtest.write(result, args.out)
    print(table.read_text(), end="")
    if args.benchmarks:
        from canao.bench import SERVING_SECTION, put_section

        source = f"--model {args.model}" if args.model else f"--url {args.url}"
        command = f"canao loadtest --profile {args.profile} {source} --out {args.out} --benchmarks {args.benchmarks}"
        put_section(resolve_path(args.benchmarks), SERVING_SECTION,
                    f"Measured with `{command}`.\n\n{table.read_text()}")


def cmd_search_report(args) -> None:
    from canao.search_report import write_report

    print(write_report(args.student, resolve_path(args.benchmarks)), end="")


def cmd_deploy(args) -> None:
    from canao.stages import Context, execute

    device = verify_manifest(args.compiled)["config"]["device"]
    inputs = {"teacher": args.teacher or args.model, "model": args.model, "compiled": args.compiled,
              "benchmark": args.benchmark, "teacher_benchmark": args.teacher_benchmark or args.benchmark}
    if args.search:
        inputs["search"] = args.search
    manifest, _ = execute("deploy", args.profile, args.overrides, inputs, args.out,
                          Context(device=device, parent_run_id=args.mlflow_run or ""))
    print(json.dumps({"registry_uri": manifest["registry_uri"], "backend": manifest["backend"],
                      "out": str(Path(args.out).resolve())}))


def cmd_submit(args) -> None:
    from pipelines.submit import submit  # the kfp side lives outside canao/

    print(json.dumps(submit(args.host, args.experiment, args.profile, args.device, args.budgets or [10.0, 25.0])))


def cmd_lm_teacher(args) -> None:
    from canao.models.llama_lm import save_teacher

    cfg = load_config("lm-teacher", args.profile, args.config, args.overrides)
    manifest = save_teacher(cfg, args.out)
    print(json.dumps({"model": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_lm_data(args) -> None:
    from canao.data.text import build_corpus

    cfg = load_config("lm-data", args.profile, args.config, args.overrides)
    manifest = build_corpus(cfg, args.out)
    print(json.dumps({"out": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_distill_lm(args) -> None:
    from canao.distill_lm import train_decoder_supernet

    cfg = load_config("distill-lm", args.profile, args.config, args.overrides)
    manifest = train_decoder_supernet(cfg, args.teacher, args.data, args.out)
    print(json.dumps({"supernet": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_latency_lm(args) -> None:
    from canao.latency import fit_decoder_latency_model

    cfg = load_config("latency-lm", args.profile, args.config, args.overrides)
    manifest = fit_decoder_latency_model(cfg, args.device, args.out, args.teacher)
    print(json.dumps({"latency_model": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_search_lm(args) -> None:
    from canao.search import FRONT_JSON, FRONT_PNG, search_lm

    cfg = load_config("search-lm", args.profile, args.config, args.overrides)
    manifest = search_lm(cfg, args.supernet, args.latency, args.out)
    out = Path(args.out).resolve()
    print(json.dumps({"front": str(out / FRONT_JSON), "plot": str(out / FRONT_PNG), **manifest["metrics"]}))


def cmd_finalize_lm(args) -> None:
    from canao.distill_lm import finalize_student

    cfg = load_config("finalize-lm", args.profile, args.config, args.overrides)
    manifest = finalize_student(cfg, args.supernet, args.search, args.out)
    m = manifest["metrics"]
    keys = ("subnet", "perplexity", "teacher_perplexity", "perplexity_vs_teacher", "greedy_agreement",
            "predicted_ms_per_token", "measured_ms_per_token")
    print(json.dumps({"model": str(Path(args.out).resolve()), **{k: m[k] for k in keys}}))


def cmd_eval_lm(args) -> None:
    from canao.data.text import perplexity, read_text_file
    from canao.models.llama_lm import load_causal_lm, load_tokenizer

    text = read_text_file(args.data)
    hardware.torch_threads(args.threads)
    result = perplexity(load_causal_lm(args.model), load_tokenizer(args.model), text, args.max_tokens)
    print(json.dumps({"perplexity": round(result["perplexity"], 4), "tokens": result["tokens"]}))


def cmd_compile_lm(args) -> None:
    from canao.compile import compile_lm

    overrides = [*args.overrides] + ([f"trials={args.trials}"] if args.trials is not None else [])
    cfg = load_config("compile-lm", args.profile, args.config, overrides)
    manifest = compile_lm(args.model, args.device, cfg, args.out)
    print(json.dumps({"out": str(Path(args.out).resolve()), "backends": manifest["backends"], **manifest["metrics"]}))


def cmd_export_gguf(args) -> None:
    from canao.models.gguf_export import GGUF_FILE, export_gguf

    out = export_gguf(args.model, args.out or Path(args.model) / GGUF_FILE, args.precision)
    print(json.dumps({"out": str(out.resolve()), "bytes": out.stat().st_size, "precision": args.precision}))


def cmd_generate(args) -> None:
    from canao.apps import generate

    sampling = generate.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    hardware.torch_threads(args.threads)
    decoder = generate.open_decoder(args.model, args.max_context)
    ids = generate.encode_prompt(decoder.tokenizer, args.prompt, chat=not args.no_chat)
    ids, dropped = generate.fit_prompt(ids, args.max_new_tokens, decoder)
    if dropped:
        print(f"canao generate: prompt truncated from the left: kept its last {len(ids)} tokens, dropped {dropped} "
              f"(context window {decoder.max_context} tokens, {args.max_new_tokens} reserved for new ones)",
              file=sys.stderr)
    times = []
    for _, ms, text in generate.with_text(decoder.tokenizer, generate.stream(decoder, ids, args.max_new_tokens,
                                                                            sampling)):
        times.append(ms)
        print(text, end="", flush=True)
    print()
    stats = generate.timings(times)
    print(json.dumps({"backend": decoder.backend, "prompt_tokens": len(ids), **{
        k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()}}), file=sys.stderr)


def cmd_bench_lm(args) -> None:
    from canao import bench

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    cfg = load_config("bench-lm", args.profile, args.config, args.overrides)
    records = []
    for device_key in [args.device] if args.device else cfg.devices:
        records += bench.bench_generation(args.model, args.artifact, device_key, backends, cfg,
                                          load_config("compile-lm", args.profile))
    bench.write_records(records, args.out)
    print(bench.generation_table(records))


def _add_model_on_device_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--model", required=True, help="model directory (save_pretrained layout)")
    p.add_argument("--device", required=True, help="device key from device_lab/devices.yaml")
    p.add_argument("--seq-len", type=int, required=True, help="static sequence length")


def _add_predictor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (save_pretrained layout) or compiled artifact")
    p.add_argument("--backend", default="auto",
                   help="a compiled artifact's backend (auto: the fastest within its numerics bound)")
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the windowing, e.g. --set max_seq_len=256")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canao", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("teacher", help="fine-tune the QA teacher and evaluate it on dev")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="model directory to write")
    p.set_defaults(func=cmd_teacher)

    teacher_help = "the QA teacher's directory (default: outputs/<profile>/teacher)"
    p = sub.add_parser("distill", help="pretraining-distill: the elastic supernet, distilled from the teacher")
    _add_config_args(p)
    p.add_argument("--teacher", help=teacher_help)
    p.add_argument("--out", required=True, help="supernet directory to write")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("latency", help="fit a device's latency model on compiled, measured subnets (lab up)")
    _add_config_args(p)
    p.add_argument("--teacher", help=teacher_help + "; only its shape is used")
    p.add_argument("--device", required=True, help="device key from device_lab/devices.yaml")
    p.add_argument("--out", required=True, help="latency model directory to write")
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("search", help="NSGA-II search: the F1 / latency Pareto front (front.json, front.png)")
    _add_config_args(p)
    p.add_argument("--supernet", required=True, help="a `canao distill` output")
    p.add_argument("--latency", required=True, help="a `canao latency` output (its device is the search's)")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("finalize", help="extract, distill, evaluate, compile and benchmark the chosen subnet")
    _add_config_args(p)
    p.add_argument("--teacher", help=teacher_help)
    p.add_argument("--supernet", required=True, help="a `canao distill` output")
    p.add_argument("--search", required=True, help="a `canao search` output")
    p.add_argument("--out", required=True, help="student model directory to write")
    p.set_defaults(func=cmd_finalize)

    p = sub.add_parser("search-report", help="a finalize output's chain figures -> BENCHMARKS.md's search section")
    p.add_argument("--student", required=True, help="a `canao finalize` output (benchmarked)")
    p.add_argument("--benchmarks", default="BENCHMARKS.md", help="Markdown file whose section to write")
    p.set_defaults(func=cmd_search_report)

    p = sub.add_parser("eval-qa", help="EM/F1 of a QA model on a SQuAD v1.1 file")
    _add_predictor_args(p)
    p.add_argument("--data", required=True, help="SQuAD v1.1 JSON file")
    p.add_argument("--questions", type=int, default=0, help="first N questions only (0: all)")
    p.add_argument("--out", help="write predictions (question id -> answer) here")
    p.set_defaults(func=cmd_eval_qa)

    p = sub.add_parser("qa", help="answer one question about a context")
    _add_predictor_args(p)
    p.add_argument("--context", required=True)
    p.add_argument("--question", required=True)
    p.set_defaults(func=cmd_qa)

    p = sub.add_parser("compile", help="compile a QA model with TVM for a device (+ peer exports)")
    _add_model_on_device_args(p)
    p.add_argument("--trials", type=int, help="MetaSchedule trials for kernels not yet tuned (default: profile's)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("bench", help="time a model on a device: TVM against the peers")
    _add_model_on_device_args(p)
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    p.add_argument("--artifact", help="a `canao compile` output (default: compile into outputs/compiled/)")
    p.add_argument("--out", required=True, help="JSON records to write")
    p.set_defaults(func=cmd_bench)

    device_lab.add_cli(sub)

    p = sub.add_parser("deploy", help="choose the serving backend, push to the S3 registry, register in MLflow")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="the student model directory")
    p.add_argument("--compiled", required=True, help="its `canao compile` artifact")
    p.add_argument("--benchmark", required=True, help="a directory with its benchmark records.json and manifest")
    p.add_argument("--teacher", help="the teacher model directory, for lineage (default: --model)")
    p.add_argument("--teacher-benchmark", help="the teacher's benchmark directory (default: --benchmark)")
    p.add_argument("--search", help="the `canao search` directory the student came from (its front is kept)")
    p.add_argument("--mlflow-run", help="MLflow run id to register the model version under (default: none)")
    p.add_argument("--out", required=True, help="directory to write the deployment record to")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("submit", help="run the canao-compress pipeline on a Kubeflow Pipelines endpoint")
    p.add_argument("--host", required=True, help="Kubeflow Pipelines API URL")
    p.add_argument("--experiment", default="canao", help="Kubeflow experiment (default: canao)")
    p.add_argument("--profile", choices=PROFILES, default="quick")
    p.add_argument("--device", default="x86-1t", help="device key from device_lab/devices.yaml")
    p.add_argument("--budget-ms", type=float, action="append", dest="budgets", help="latency budget (repeatable)")
    p.set_defaults(func=cmd_submit)

    registry.add_cli(sub)
    services.add_cli(sub)

    p = sub.add_parser("bench-suite", help="`make bench`: every suite model, length and device -> BENCHMARKS.md")
    p.add_argument("--profile", choices=PROFILES, default="full", help="compile/bench profile (default: full)")
    p.add_argument("--teacher", default="outputs/full/teacher", help="the trained QA teacher, if there is one")
    p.add_argument("--lm-teacher", default="outputs/lm-teacher",
                   help="the generation teacher (`canao lm-teacher`); made if absent")
    p.add_argument("--lm-data", default="outputs/lm-data", help="the LM corpus (`canao lm-data`); made if absent")
    p.add_argument("--lm-student", help="a student decoder directory for the generation table (default: none)")
    p.add_argument("--generation-only", action="store_true",
                   help="`make bench-lm`: replace the generation section (and its records) alone, keep the rest")
    p.add_argument("--out", default="BENCHMARKS.md", help="Markdown report (records beside it as .json)")
    p.set_defaults(func=cmd_bench_suite)

    p = sub.add_parser("serve", help="serve models over HTTP: the QA and generation APIs, metrics and the web page")
    _add_config_args(p)
    p.add_argument("--model", help="the QA model: a model directory, a `canao compile` artifact directory, or a "
                   "registry model NAME@ALIAS (e.g. canao-qa@production; needs MLflow and S3, `canao services env`); "
                   "absent or empty: none")
    p.add_argument("--lm-model", help="the generation model: a model directory (PyTorch), a `canao compile-lm` "
                   "artifact directory (TVM), or a registry model NAME@ALIAS; absent or empty: none")
    p.add_argument("--host", help="bind address (default: the profile's, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: the profile's)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("loadtest", help="concurrent clients against /v1/qa on loopback: answers/s, p50, p99")
    _add_config_args(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="start `canao serve` for this model on a free loopback port")
    target.add_argument("--url", help="a server already running on loopback, e.g. http://127.0.0.1:8000")
    p.add_argument("--serve-set", dest="serve_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the started server's config (repeatable)")
    p.add_argument("--out", required=True, help="JSON figures to write (and the table beside it as .md)")
    p.add_argument("--benchmarks", metavar="FILE.md",
                   help="also put the table and this command in this Markdown file's serving section")
    p.set_defaults(func=cmd_loadtest)


    p = sub.add_parser("lm-teacher", help="the generation teacher (SmolLM2-135M-Instruct, or a random tiny decoder)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="model directory to write")
    p.set_defaults(func=cmd_lm_teacher)

    p = sub.add_parser("lm-data", help="the LM corpus: train.txt and the held-out heldout.txt")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=cmd_lm_data)

    p = sub.add_parser("distill-lm", help="the elastic decoder supernet, distilled from the generation teacher")
    _add_config_args(p)
    p.add_argument("--teacher", required=True, help="a `canao lm-teacher` output")
    p.add_argument("--data", required=True, help="a `canao lm-data` output (train.txt trains, heldout.txt scores)")
    p.add_argument("--out", required=True, help="supernet directory to write")
    p.set_defaults(func=cmd_distill_lm)

    p = sub.add_parser("latency-lm", help="fit a local device's per-token decode latency model on compiled subnets")
    _add_config_args(p)
    p.add_argument("--teacher", required=True, help="the generation teacher's directory; only its shape is used")
    p.add_argument("--device", required=True, help="a local device key from device_lab/devices.yaml")
    p.add_argument("--out", required=True, help="latency model directory to write")
    p.set_defaults(func=cmd_latency_lm)

    p = sub.add_parser("search-lm", help="NSGA-II search: the perplexity / ms-per-token front (front.json, .png)")
    _add_config_args(p)
    p.add_argument("--supernet", required=True, help="a `canao distill-lm` output")
    p.add_argument("--latency", required=True, help="a `canao latency-lm` output (its device is the search's)")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=cmd_search_lm)

    p = sub.add_parser("finalize-lm", help="extract the generation search's chosen subnet and fine-tune it by KD")
    _add_config_args(p)
    p.add_argument("--supernet", required=True, help="a `canao distill-lm` output")
    p.add_argument("--search", required=True, help="a `canao search-lm` output")
    p.add_argument("--out", required=True, help="student model directory to write")
    p.set_defaults(func=cmd_finalize_lm)

    p = sub.add_parser("eval-lm", help="perplexity of a decoder on a text file (one protocol for all models)")
    p.add_argument("--model", required=True, help="model directory (save_pretrained layout)")
    p.add_argument("--data", required=True, help="UTF-8 text file, e.g. the heldout.txt of `canao lm-data`")
    p.add_argument("--max-tokens", type=int, default=0, help="score the first N tokens only (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.set_defaults(func=cmd_eval_lm)

    p = sub.add_parser("compile-lm", help="compile a decoder's prefill and decode steps with TVM for a device")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="model directory (save_pretrained layout)")
    p.add_argument("--device", required=True, help="device key from device_lab/devices.yaml")
    p.add_argument("--trials", type=int, help="MetaSchedule trials for kernels not yet tuned (default: profile's)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.set_defaults(func=cmd_compile_lm)

    p = sub.add_parser("export-gguf", help="a decoder as a GGUF file for llama.cpp (the teacher file's tokenizer)")
    p.add_argument("--model", required=True, help="model directory (save_pretrained layout)")
    p.add_argument("--precision", choices=("teacher", "f32"), default="teacher",
                   help="teacher: stored as the teacher GGUF stores each tensor (Q4_1 matmuls); f32: float32")
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
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench-lm", help="time generation: TVM, PyTorch and llama.cpp on the teacher GGUF")
    _add_config_args(p)
    p.add_argument("--model", help="model directory (the torch backend)")
    p.add_argument("--artifact", help="a `canao compile-lm` output (the tvm backend)")
    p.add_argument("--device", help="one device key (default: the profile's devices)")
    p.add_argument("--backends", default=",".join(GEN_BACKENDS), help="comma-separated")
    p.add_argument("--out", required=True, help="JSON records to write")
    p.set_defaults(func=cmd_bench_lm)

    p = sub.add_parser("squad-score", help="the official SQuAD v1.1 metric")
    p.add_argument("data", help="SQuAD v1.1 JSON file with gold answers")
    p.add_argument("predictions", help="JSON object: question id -> answer text")
    p.set_defaults(func=cmd_squad_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, SquadFormatError, FileNotFoundError, FileExistsError, ValueError, ConnectionError,
            registry.RegistryError, services.ServiceError) as e:
        print(f"canao {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
