"""The tools' subcommands: compile, bench, bench-suite, serve, loadtest, search-report,
deploy, submit (the device lab, the services and the registry register their own).

Each command imports its stage's module when it runs, not at the top: together the stages
import torch, transformers, TVM, Optuna and MLflow, seconds that every `canao` call (a
`--help`, `canao services up`) would otherwise pay.
"""

from __future__ import annotations

import json
from pathlib import Path

from canao.cli.common import add_config_args, add_model_on_device_args
from canao.config import PROFILES, resolve_path
from canao.lab import devices, rpc
from canao.manifest import verify_manifest, write_records, write_text_atomic
from canao.mlops import registry, services
from canao.profiles import load_config
from canao.qa.bench import BACKENDS


def cmd_compile(args) -> None:
    from canao.qa.compile import compile_model

    overrides = [*args.overrides, f"seq_len={args.seq_len}"]
    if args.trials is not None:
        overrides.append(f"trials={args.trials}")
    cfg = load_config("compile", args.profile, args.config, overrides)
    manifest = compile_model(args.model, devices.get_device(args.device), cfg, args.out)
    print(json.dumps({"out": str(Path(args.out).resolve()), "backends": manifest["backends"], **manifest["metrics"]}))


def cmd_bench(args) -> None:
    from canao.compile.relax import compiled
    from canao.qa.bench import bench, table
    from canao.qa.compile import compile_model

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    compile_cfg = load_config("compile", args.profile, None, [f"seq_len={args.seq_len}"])
    bench_cfg = load_config("bench", args.profile, args.config, args.overrides)
    device = devices.get_device(args.device)
    artifact = args.artifact or compiled(args.model, device, compile_cfg, compile_model)
    records = bench(artifact, args.model, device, backends, bench_cfg)
    write_records(records, args.out)
    print(table(records))


def cmd_bench_suite(args) -> None:
    from canao.bench.suite import suite

    student = f" --lm-student {args.lm_student}" if args.lm_student else ""
    only = " --generation-only" if args.generation_only else ""
    suite(resolve_path(args.teacher), args.profile, Path(args.out),
                command=f"canao bench-suite --profile {args.profile}{only}{student} --out {args.out}",
                lm_teacher_dir=resolve_path(args.lm_teacher), lm_data_dir=resolve_path(args.lm_data),
                lm_student_dir=resolve_path(args.lm_student) if args.lm_student else None,
                generation_only=args.generation_only)


def cmd_serve(args) -> int:
    from canao.apps.serve import serve

    overrides = [*args.overrides, *(f"{k}={v}" for k, v in (("host", args.host), ("port", args.port)) if v)]
    return serve(args.model, args.lm_model, load_config("serve", args.profile, args.config, overrides))


def cmd_loadtest(args) -> None:
    from canao.apps import loadtest
    from canao.bench.suite import GENERATION_SERVING_SECTION, SERVING_SECTION, put_section

    # a spawned generation server is load-tested on its generation endpoint
    overrides = [*args.overrides, "task=generate"] if args.lm_model else args.overrides
    cfg = load_config("loadtest", args.profile, args.config, overrides)
    if args.url:
        result = loadtest.run(args.url, cfg)
    else:
        with loadtest.spawned_server(args.model, args.profile, args.serve_overrides, lm_model=args.lm_model) as url:
            result = loadtest.run(url, cfg)
    table = loadtest.write(result, args.out)
    print(table.read_text(), end="")
    if args.benchmarks:
        source = (f"--model {args.model}" if args.model else f"--lm-model {args.lm_model}" if args.lm_model
                  else f"--url {args.url}")
        settings = "".join(f" --set {o}" for o in args.overrides)
        command = f"canao loadtest --profile {args.profile}{settings} {source} --out {args.out} " \
                  f"--benchmarks {args.benchmarks}"
        put_section(resolve_path(args.benchmarks), SERVING_SECTION if cfg.task == "qa" else GENERATION_SERVING_SECTION,
                    f"Measured with `{command}`.\n\n{table.read_text()}")


def cmd_search_report(args) -> None:
    from canao.bench.report import write_report

    print(write_report(args.student, resolve_path(args.benchmarks)), end="")


def cmd_deploy(args) -> None:
    from canao.mlops.stages import Context, execute

    device = verify_manifest(args.compiled)["config"]["device"]
    inputs = {"teacher": args.teacher or args.model, "model": args.model, "compiled": args.compiled,
              "benchmark": args.benchmark, "teacher_benchmark": args.teacher_benchmark or args.benchmark}
    if args.search:
        inputs["search"] = args.search
    manifest, _ = execute("deploy", args.profile, args.overrides, inputs, args.out,
                          Context(device=devices.get_device(device), parent_run_id=args.mlflow_run or ""))
    print(json.dumps({"registry_uri": manifest["registry_uri"], "backend": manifest["backend"],
                      "out": str(Path(args.out).resolve())}))


def cmd_bench_kd(args) -> None:
    from canao.bench.suite import TRAINING_SECTION, put_section
    from canao.bench.training import kd_throughput, training_section
    from canao.qa.config import SquadFeatureConfig
    from canao.qa.model import minilm_dir
    from canao.qa.space import SubnetConfig

    cfg = load_config("finalize", args.profile, args.config, args.overrides)
    subnet = SubnetConfig.from_dict(json.loads(args.subnet), "--subnet")
    features = SquadFeatureConfig(max_seq_len=args.seq_len, doc_stride=args.seq_len // 4)
    result = kd_throughput(Path(args.teacher) if args.teacher else minilm_dir(), subnet, args.questions, features,
                           cfg.train, cfg.kd, resolve_path(args.work_dir))
    result["command"] = args.command_line
    print(json.dumps(result, indent=1))
    if args.benchmarks:
        put_section(Path(args.benchmarks), TRAINING_SECTION, training_section(result))


def cmd_bench_students(args) -> None:
    from canao.bench.students import students_section, study
    from canao.bench.suite import PROXY_SECTION, STUDENTS_SECTION, put_section
    from canao.qa.config import SquadFeatureConfig
    from canao.qa.space import SubnetConfig

    overrides = [*args.overrides, f"data.train_questions={args.questions}",
                 f"data.eval_questions={args.eval_questions}"]
    cfg = load_config("finalize", args.profile, args.config, overrides)
    try:
        listed = json.loads(Path(args.subnets).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--subnets {args.subnets}: not a readable JSON file: {e}") from None
    if not isinstance(listed, list) or not listed:
        raise ValueError(f"--subnets {args.subnets}: must hold a non-empty JSON list of subnets")
    subnets = [SubnetConfig.from_dict(s, f"--subnets {args.subnets}: [{i}]") for i, s in enumerate(listed)]
    features = SquadFeatureConfig(max_seq_len=args.seq_len, doc_stride=args.seq_len // 4)
    space = load_config("distill", args.profile).space
    try:
        result = study(resolve_path(args.teacher), subnets, space, cfg, features, args.importance_batches,
                       resolve_path(args.work_dir), resolve_path(args.supernet) if args.supernet else None)
    except ValueError as e:
        raise ValueError(f"--subnets {args.subnets}: {e}") from None
    result["command"] = args.command_line
    write_text_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if args.benchmarks:
        put_section(Path(args.benchmarks), PROXY_SECTION if args.supernet else STUDENTS_SECTION,
                    students_section(result))


def cmd_submit(args) -> None:
    from pipelines.submit import submit  # the kfp side lives outside canao/

    print(json.dumps(submit(args.host, args.experiment, args.profile, args.device, args.budgets or [])))


def register(sub) -> None:
    """The tools' subcommands on `sub` (the parser's subparsers)."""
    p = sub.add_parser("search-report", help="a finalize output's chain figures -> BENCHMARKS.md's search section")
    p.add_argument("--student", required=True, help="a `canao finalize` output (benchmarked)")
    p.add_argument("--benchmarks", default="BENCHMARKS.md", help="Markdown file whose section to write")
    p.set_defaults(func=cmd_search_report)

    p = sub.add_parser("bench-kd", help="finalize's KD throughput: the teacher every step vs its kept outputs")
    add_config_args(p)
    p.add_argument("--teacher", help="a QA model directory (default: MiniLM from its package, untrained span head)")
    p.add_argument("--subnet", required=True, help='the student, e.g. {"num_layers": 3, "hidden_size": 384, '
                   '"heads": [4, 4, 4], "ffn_sizes": [1024, 512, 1024]}')
    p.add_argument("--questions", type=int, default=600, help="first N training questions")
    p.add_argument("--seq-len", type=int, default=256, help="window length (doc stride: a quarter of it)")
    p.add_argument("--benchmarks", help="also write the figures into this Markdown file's section")
    p.add_argument("--work-dir", default="outputs/bench-kd", help="scratch directory, removed afterwards")
    p.set_defaults(func=cmd_bench_kd)

    p = sub.add_parser("bench-students", help="candidate students distilled alike and scored: which are worth it")
    add_config_args(p)
    p.add_argument("--teacher", required=True, help="the teacher's model directory")
    p.add_argument("--subnets", required=True, help="a JSON file: a list of subnets, e.g. [{\"num_layers\": 3, "
                   "\"hidden_size\": 384, \"heads\": [4, 4, 4], \"ffn_sizes\": [1024, 512, 1024], "
                   "\"layers\": [0, 2, 5]}]")
    p.add_argument("--questions", type=int, default=3000, help="first N training questions to distil on")
    p.add_argument("--eval-questions", type=int, default=1000, help="first N dev-a questions to score on")
    p.add_argument("--seq-len", type=int, default=256, help="window length (doc stride: a quarter of it)")
    p.add_argument("--importance-batches", type=int, default=16, help="training batches that rank heads and neurons")
    p.add_argument("--supernet", help="a `canao distill` output: also score each subnet as its slice (the proxy)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--benchmarks", help="also write the figures into this Markdown file's section")
    p.add_argument("--work-dir", default="outputs/bench-students", help="scratch directory, removed afterwards")
    p.set_defaults(func=cmd_bench_students)

    p = sub.add_parser("compile", help="compile a QA model with TVM for a device (+ peer exports)")
    add_model_on_device_args(p)
    p.add_argument("--trials", type=int, help="MetaSchedule trials for kernels not yet tuned (default: profile's)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("bench", help="time a model on a device: TVM against the peers")
    add_model_on_device_args(p)
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    p.add_argument("--artifact", help="a `canao compile` output (default: compile into outputs/compiled/)")
    p.add_argument("--out", required=True, help="JSON records to write")
    p.set_defaults(func=cmd_bench)

    rpc.add_cli(sub)

    p = sub.add_parser("deploy", help="choose the serving backend, push to the S3 registry, register in MLflow")
    add_config_args(p)
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
    add_config_args(p)
    p.add_argument("--model", help="the QA model: a model directory, a `canao compile` artifact directory, or a "
                   "registry model NAME@ALIAS (e.g. canao-qa@production; needs MLflow and S3, `canao services env`); "
                   "absent or empty: none")
    p.add_argument("--lm-model", help="the generation model: a model directory (PyTorch), a `canao compile-lm` "
                   "artifact directory (TVM), or a registry model NAME@ALIAS; absent or empty: none")
    p.add_argument("--host", help="bind address (default: the profile's, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: the profile's)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("loadtest", help="concurrent clients against /v1/qa or /v1/generate on loopback: answers/s "
                       "(and tokens/s, time to first token), p50, p99")
    add_config_args(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="start `canao serve` for this QA model on a free loopback port")
    target.add_argument("--lm-model", help="start `canao serve` for this generation model on a free loopback port "
                        "and load-test /v1/generate (sets task=generate)")
    target.add_argument("--url", help="a server already running on loopback, e.g. http://127.0.0.1:8000 (its "
                        "endpoint: the config's task, --set task=generate for /v1/generate)")
    p.add_argument("--serve-set", dest="serve_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the started server's config (repeatable)")
    p.add_argument("--out", required=True, help="JSON figures to write (and the table beside it as .md)")
    p.add_argument("--benchmarks", metavar="FILE.md",
                   help="also put the table and this command in this Markdown file's serving section")
    p.set_defaults(func=cmd_loadtest)
