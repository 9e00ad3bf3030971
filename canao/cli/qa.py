"""The QA family's subcommands: teacher, distill, latency, search, finalize, eval-qa, qa,
squad-score.

Each command imports its stage's module when it runs, not at the top: together the stages
import torch, transformers, TVM, Optuna and MLflow, seconds that every `canao` call (a
`--help`, `canao services up`) would otherwise pay.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from canao import hardware
from canao.cli.common import add_config_args, add_predictor_args
from canao.config import apply_overrides, from_dict, to_dict
from canao.lab import devices
from canao.manifest import read_manifest, verify_manifest
from canao.profiles import load_config
from canao.qa.config import SquadFeatureConfig
from canao.qa.data import SquadExample, load_squad, squad_score


def cmd_teacher(args) -> None:
    from canao.qa.teacher import train_teacher

    cfg = load_config("teacher", args.profile, args.config, args.overrides)
    manifest = train_teacher(cfg, args.out)
    m = manifest["metrics"]
    print(json.dumps({"exact_match": round(m["exact_match"], 2), "f1": round(m["f1"], 2),
                      "questions": m["questions"], "model": str(Path(args.out).resolve())}))


def cmd_distill(args) -> None:
    from canao.qa.distill import train_supernet

    cfg = load_config("distill", args.profile, args.config, args.overrides)
    manifest = train_supernet(cfg, _teacher(args), args.out)
    print(json.dumps({"supernet": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_latency(args) -> None:
    from canao.qa.latency import fit_latency_model

    cfg = load_config("latency", args.profile, args.config, args.overrides)
    manifest = fit_latency_model(cfg, devices.get_device(args.device), args.out, _teacher(args))
    print(json.dumps({"latency_model": str(Path(args.out).resolve()), **manifest["metrics"]}))


def cmd_search(args) -> None:
    from canao.codesign.pareto import FRONT_JSON, FRONT_PNG
    from canao.qa.search import search

    cfg = load_config("search", args.profile, args.config, args.overrides)
    manifest = search(cfg, args.supernet, args.latency, args.out)
    out = Path(args.out).resolve()
    print(json.dumps({"front": str(out / FRONT_JSON), "plot": str(out / FRONT_PNG), **manifest["metrics"]}))


def cmd_finalize(args) -> None:
    from canao.qa.finalize import finalize

    cfg = load_config("finalize", args.profile, args.config, args.overrides)
    manifest = finalize(cfg, _teacher(args), args.supernet, args.search, args.out)
    m = manifest["metrics"]
    keys = ("exact_match", "f1", "teacher_f1", "f1_drop", "questions", "student_ms", "teacher_ms",
            "student_best_backend", "student_best_backend_f1", "speedup_vs_teacher_litert")
    print(json.dumps({"model": str(Path(args.out).resolve()), **{k: m[k] for k in keys if k in m}}))


def _teacher(args) -> str:
    return args.teacher or f"outputs/{args.profile}/teacher"


def _predictor(args):
    from canao.qa.predictor import open_predictor

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
    from canao.qa.predictor import evaluate

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
    scores = squad_score(examples, predictions)
    if scores["missing"]:
        print(f"{path}: {scores['missing']} of {len(examples)} questions have no prediction; "
              "they are scored as wrong", file=sys.stderr)
    print(json.dumps({"exact_match": scores["exact_match"], "f1": scores["f1"]}))


def register(sub) -> None:
    """The QA family's subcommands on `sub` (the parser's subparsers)."""
    p = sub.add_parser("teacher", help="fine-tune the QA teacher and evaluate it on dev")
    add_config_args(p)
    p.add_argument("--out", required=True, help="model directory to write")
    p.set_defaults(func=cmd_teacher)

    teacher_help = "the QA teacher's directory (default: outputs/<profile>/teacher)"

    p = sub.add_parser("distill", help="pretraining-distill: the elastic supernet, distilled from the teacher")
    add_config_args(p)
    p.add_argument("--teacher", help=teacher_help)
    p.add_argument("--out", required=True, help="supernet directory to write")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("latency", help="fit a device's latency model on compiled, measured subnets (lab up)")
    add_config_args(p)
    p.add_argument("--teacher", help=teacher_help + "; only its shape is used")
    p.add_argument("--device", required=True, help="device key from device_lab/devices.yaml")
    p.add_argument("--out", required=True, help="latency model directory to write")
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("search", help="NSGA-II search: the F1 / latency Pareto front (front.json, front.png)")
    add_config_args(p)
    p.add_argument("--supernet", required=True, help="a `canao distill` output")
    p.add_argument("--latency", required=True, help="a `canao latency` output (its device is the search's)")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("finalize", help="extract, distill, evaluate, compile and benchmark the chosen subnet")
    add_config_args(p)
    p.add_argument("--teacher", help=teacher_help)
    p.add_argument("--supernet", required=True, help="a `canao distill` output")
    p.add_argument("--search", required=True, help="a `canao search` output")
    p.add_argument("--out", required=True, help="student model directory to write")
    p.set_defaults(func=cmd_finalize)

    p = sub.add_parser("eval-qa", help="EM/F1 of a QA model on a SQuAD v1.1 file")
    add_predictor_args(p)
    p.add_argument("--data", required=True, help="SQuAD v1.1 JSON file")
    p.add_argument("--questions", type=int, default=0, help="first N questions only (0: all)")
    p.add_argument("--out", help="write predictions (question id -> answer) here")
    p.set_defaults(func=cmd_eval_qa)

    p = sub.add_parser("qa", help="answer one question about a context")
    add_predictor_args(p)
    p.add_argument("--context", required=True)
    p.add_argument("--question", required=True)
    p.set_defaults(func=cmd_qa)

    p = sub.add_parser("squad-score", help="the official SQuAD v1.1 metric")
    p.add_argument("data", help="SQuAD v1.1 JSON file with gold answers")
    p.add_argument("predictions", help="JSON object: question id -> answer text")
    p.set_defaults(func=cmd_squad_score)
