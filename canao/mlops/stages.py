"""The pipeline's stages, the QA chain's and the generation chain's, as pure functions
(config, input dirs) -> output dir, with a content-hash cache.

`execute()` is the one call a pipeline component makes: it loads the stage's config, keys
the stage by the config hash, the target device and the content (manifest file hashes) of
its inputs, and runs it only when the cache (`outputs/cache/<stage>/<key>/`, env
CANAO_CACHE_DIR) holds no verified result for that key; then it links the result into the
output directory the pipeline asked for and logs the stage as a child run of the pipeline's
MLflow run. A pipeline re-run after a failure thus resumes after the last finished stage
(and the teacher resumes inside its training from its checkpoints).

A stage is added by writing its runner `(cfg, inputs, out_dir, context) -> manifest` and
naming it in RUNNERS. Runners import their stage's implementation when they run: a component
whose result is in the cache then never loads torch, transformers, TVM or LiteRT (seconds per
pipeline task).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from canao.config import DeployConfig, config_hash, resolve_path, to_dict
from canao.lab.devices import Device
from canao.lm.config import GenBenchConfig, LMDeployConfig
from canao.manifest import read_manifest, staged_dir, verify_manifest, verify_stage, write_manifest, write_records
from canao.mlops import tracking
from canao.mlops.registry import COMPILED_DIR, MODEL_DIR, Registry, content_version, directory_files
from canao.profiles import load_config
from canao.qa.config import BenchConfig, BertShape
from canao.qa.space import SubnetConfig, flops

if TYPE_CHECKING:
    from canao.codesign.pareto import TrialHook

CACHE_DIR = "outputs/cache"  # relative to the project root; env CANAO_CACHE_DIR overrides
RECORDS = "records.json"
TEACHER_RECORDS = "teacher_records.json"  # benchmark-lm: llama.cpp on the teacher's GGUF, the peer
DEPLOYMENT = "deployment.json"


@dataclass(frozen=True)
class Context:
    device: Device  # the device the pipeline targets, resolved at the edge (the CLI, a component)
    parent_run_id: str = ""  # MLflow run of the pipeline run; "" = not tracked
    pipeline_run: str = ""  # the pipeline run's name, for lineage


def cache_root() -> Path:
    return resolve_path(os.environ.get("CANAO_CACHE_DIR") or CACHE_DIR)


def content_id(directory: Path) -> str:
    """What an input directory holds, by content: the hash of its manifest's file hashes."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"{directory}: no manifest.json; the input artifact is incomplete")
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:16]


def cache_key(stage: str, cfg, device: Device, inputs: dict[str, Path]) -> str:
    """A result's identity: stage, config, device and the machine it stands for (training's bf16
    choice and every timing depend on it), and the inputs by content."""
    identity = {"stage": stage, "config": config_hash(cfg), "device": device.key,
                "hardware": device.hardware().fingerprint(),
                "inputs": {name: content_id(path) for name, path in sorted(inputs.items())}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _finished(directory: Path) -> dict | None:
    """The manifest of a complete, intact result, or None (absent, partial or corrupted)."""
    if read_manifest(directory) is None:
        return None
    try:
        return verify_manifest(directory)
    except ValueError:
        return None


def _link_tree(source: Path, target: Path) -> None:
    """`target` as a copy of `source` made of hard links where the filesystem allows."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def _write_through_staging(out_dir: Path, fill: Callable[[Path], dict]) -> dict:
    """Let `fill` write a directory next to `out_dir`, then move it into place whole."""
    shutil.rmtree(out_dir, ignore_errors=True)  # a result that failed verification
    with staged_dir(out_dir) as staging:
        return fill(staging)


def run_teacher(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.qa.teacher import train_teacher
    return train_teacher(cfg, out_dir)


def run_distill(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.qa.distill import train_supernet
    return train_supernet(cfg, inputs["teacher"], out_dir)


def run_latency(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.qa.latency import fit_latency_model
    return fit_latency_model(cfg, context.device, out_dir, inputs["teacher"])


def _trial_logger(context: Context, stage: str) -> TrialHook | None:
    """The `stage` search's hook that logs each trial as a child run of the pipeline run (tagged
    with the stage), when it is tracked."""
    if not context.parent_run_id:
        return None
    return functools.partial(tracking.log_candidate, context.parent_run_id, stage=stage)


def run_search(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.qa.search import search
    shutil.rmtree(out_dir, ignore_errors=True)  # search refuses an existing directory; a finished one is cached
    return search(cfg, inputs["supernet"], inputs["latency"], out_dir, on_trial=_trial_logger(context, "search"))


def run_finalize(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.qa.finalize import finalize
    # A model an earlier finalize in the cache distilled alike is copied, not trained again: a new
    # search that ships one new student leaves the other budgets' models and the baselines as they were.
    earlier = [d for d in sorted((cache_root() / "finalize").glob("*")) if d != out_dir and _finished(d)]
    return finalize(cfg, inputs["teacher"], inputs["supernet"], inputs["search"], out_dir, reuse=earlier)


def run_compile(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.qa.compile import compile_model
    shutil.rmtree(out_dir, ignore_errors=True)  # compile refuses an existing directory; a finished one is cached
    return compile_model(inputs["model"], context.device, cfg, out_dir)


def run_benchmark(cfg: BenchConfig, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    """Every backend the compiled artifact holds, and PyTorch, timed on the device."""
    from canao.qa.bench import BACKENDS, bench
    compiled = verify_manifest(inputs["compiled"])
    backends = tuple(b for b in BACKENDS if b in compiled["backends"] or b == "torch")
    records = bench(inputs["compiled"], inputs["model"], context.device, backends, cfg)

    def fill(staging: Path) -> dict:
        write_records(records, staging / RECORDS)
        metrics = {field: {r.backend: getattr(r, field) for r in records}
                   for field in ("p50_ms", "p90_ms", "numerics_max_abs_diff")}
        return write_manifest(staging, "benchmark", to_dict(cfg), metrics,
                              inputs={name: str(path) for name, path in inputs.items()},
                              config_hash=config_hash(cfg), device=context.device.key)

    return _write_through_staging(out_dir, fill)


def choose_backend(records: list[dict], fp32_tol: float, int8_tol: float) -> dict:
    """The fastest measured backend whose logits pass its numerics bound (fp32 backends:
    the compile tolerance; int8 backends: the looser int8 one), with every candidate judged."""
    judged = []
    for r in records:
        tolerance = int8_tol if r["backend"].endswith("-int8") else fp32_tol
        judged.append({"backend": r["backend"], "p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"],
                       "numerics_max_abs_diff": r["numerics_max_abs_diff"], "tolerance": tolerance,
                       "passes": r["numerics_max_abs_diff"] <= tolerance})
    passing = [j for j in judged if j["passes"]]
    if not passing:
        raise ValueError(f"no measured backend passes its numerics bound: {judged}")
    best = min(passing, key=lambda j: j["p50_ms"])
    return {**best, "candidates": judged}


def _qa_block(directory: Path) -> dict:
    metrics = verify_manifest(directory)["metrics"]
    return {"dir": str(directory), "exact_match": metrics["exact_match"], "f1": metrics["f1"]}


def _finalized_budgets(model_dir: Path) -> dict:
    """For a finalize output, `students` (one per budget finalize trained, the deployed one first)
    and `baseline` (each budget's uniform baseline), each entry as finalize measured it: the
    fastest backend as compiled when it benchmarked (else PyTorch), back to back with the teacher."""
    from canao.qa.finalize import BASELINE_DIR, finalized_figures
    manifest = verify_manifest(model_dir)
    if manifest["stage"] != "finalize":
        return {}
    models = finalized_figures(manifest["metrics"])

    def entry(relative: str, figures: dict) -> dict:
        benchmarked = "best_backend" in figures
        return {"budget": figures.get("budget", "deployed"), "budget_ms": figures.get("budget_ms"),
                "dir": str(model_dir / relative), "config": figures["subnet"],
                "backend": figures["best_backend"] if benchmarked else "pytorch",
                "speedup_vs_litert_fp32_teacher": figures.get("speedup_vs_teacher_litert"),
                "exact_match": figures["best_backend_exact_match" if benchmarked else "exact_match"],
                "f1": figures["best_backend_f1" if benchmarked else "f1"]}

    return {"students": [entry(d, f) for _, d, f in models if not d.endswith(BASELINE_DIR)],
            "baseline": [entry(d, f) for _, d, f in models if d.endswith(BASELINE_DIR)]}


def _architecture(model_dir: Path) -> dict:
    """The model's shape as a subnet (`SubnetConfig.to_dict()`): a plain BERT has one head
    count and FFN width for every layer, a searched student (CanaoBertConfig) one per layer."""
    config = json.loads((model_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    return {"num_layers": layers, "hidden_size": config["hidden_size"],
            "heads": config.get("layer_heads") or [config["num_attention_heads"]] * layers,
            "ffn_sizes": config.get("layer_ffn_sizes") or [config["intermediate_size"]] * layers}


def model_stats(model_dir: Path, seq_len: int) -> dict:
    """Parameters, weight bytes, and the FLOPs of one forward pass over `seq_len` tokens
    (matmuls only, `canao.qa.space.flops`)."""
    from safetensors import safe_open


    weights = model_dir / "model.safetensors"
    with safe_open(weights, framework="np") as f:
        params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    config = json.loads((model_dir / "config.json").read_text())
    # Every head is hidden_size / num_attention_heads wide (BertShape.head_size), in a student as in the teacher.
    shape = BertShape(config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
                      config["intermediate_size"])
    subnet = SubnetConfig.from_dict(_architecture(model_dir))
    return {"params": params, "size_bytes": weights.stat().st_size, "flops": flops(subnet, shape, seq_len),
            "seq_len": seq_len}


def _push_and_register(cfg, files: dict[str, Path], metadata: dict, context: Context, tags: dict[str, str],
                       figures: dict[str, float], gate: tracking.Gate) -> dict:
    """`files` pushed to the S3 registry as `cfg.model_name`'s version named by their content (a
    version already there is reused) with `metadata` in its manifest, and, in a tracked run,
    registered in MLflow with `tags` and `figures`, `cfg.alias` moved to it if it passes `gate`.
    Returns the deployment's registry block: `registry_uri`, `registry_version`, `mlflow_model`."""
    version = content_version(files)
    registry = Registry(cfg.bucket)
    if registry.has_version(cfg.model_name, version):
        print(f"{registry.uri(cfg.model_name, version)}: this content is already in the registry; reusing it")
    else:
        registry.push(cfg.model_name, version, files, metadata)
    uri = registry.uri(cfg.model_name, version)
    promotion = {"version": None, "promoted": False, "reason": "no MLflow run"}
    if context.parent_run_id:
        promotion = tracking.register_model(cfg.model_name, uri, context.parent_run_id, cfg.alias,
                                            {"registry_version": version, **tags}, figures, gate)
        print(f"deploy: {cfg.model_name} {'promoted' if promotion['promoted'] else 'not promoted'}: "
              f"{promotion['reason']}", flush=True)
    return {"registry_uri": uri, "registry_version": version,
            "mlflow_model": {"name": cfg.model_name, "alias": cfg.alias, **promotion}}


def _write_deployment(out_dir: Path, stage: str, cfg, inputs: dict[str, Path], deployment: dict, metrics: dict,
                      kept: tuple[Path, ...] = ()) -> dict:
    """A deploy stage's result: deployment.json, the `kept` files beside it, the manifest."""
    def fill(staging: Path) -> dict:
        (staging / DEPLOYMENT).write_text(json.dumps(deployment, indent=1))
        for path in kept:
            shutil.copy2(path, staging / path.name)
        return write_manifest(staging, stage, to_dict(cfg), metrics,
                              inputs={name: str(path) for name, path in inputs.items()},
                              config_hash=config_hash(cfg), registry_uri=deployment["registry_uri"],
                              backend=deployment["backend"]["backend"])

    return _write_through_staging(out_dir, fill)


def run_deploy(cfg: DeployConfig, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    """Choose the serving backend from the measurements, push the student and its compiled
    artifact to the S3 registry, register that version in MLflow under `cfg.alias`. With a
    `search` input its Pareto front (front.json, front.png) is kept beside deployment.json."""
    from canao.codesign.pareto import FRONT_JSON, FRONT_PNG
    from canao.qa.bench import BASELINE
    from canao.qa.finalize import BASELINE_DIR, BUDGETS_DIR
    compiled = verify_manifest(inputs["compiled"])
    device = compiled["config"]["device"]

    def records(name: str) -> list[dict]:
        rows = json.loads((inputs[name] / RECORDS).read_text())["records"]
        return [r for r in rows if r["device"] == device]

    choice = choose_backend(records("benchmark"), compiled["config"]["numerics_tol"], cfg.int8_numerics_tol)
    baseline = [r["p50_ms"] for r in records("teacher_benchmark") if r["backend"] == BASELINE]
    speedup = baseline[0] / choice["p50_ms"] if baseline else None
    teacher, student = _qa_block(inputs["teacher"]), _qa_block(inputs["model"])
    stats = model_stats(inputs["model"], compiled["config"]["seq_len"])
    # the student alone: the baselines and looser budgets' students finalize made beside it are figures
    student_files = {rel: path for rel, path in directory_files(inputs["model"], MODEL_DIR).items()
                     if not rel.startswith((f"{MODEL_DIR}/{BASELINE_DIR}/", f"{MODEL_DIR}/{BUDGETS_DIR}/"))}
    files = {**student_files, **directory_files(inputs["compiled"], f"{COMPILED_DIR}/{device}")}
    registry = _push_and_register(
        cfg, files, {
            "metrics": {"exact_match": student["exact_match"], "f1": student["f1"], "p50_ms": choice["p50_ms"],
                        "p90_ms": choice["p90_ms"], "speedup_vs_litert_fp32_teacher": speedup, **stats},
            "backends": {device: choice},
            "lineage": {"teacher": {"dir": teacher["dir"], "content": content_id(inputs["teacher"])},
                        "pipeline_run": context.pipeline_run, "mlflow_run_id": context.parent_run_id},
        }, context, {"device": device, "backend": choice["backend"]},
        {"f1": student["f1"], "p50_ms": choice["p50_ms"]}, tracking.Gate("f1", cfg.min_f1, "p50_ms", cfg.max_p50_ms))
    deployment = {
        "teacher": teacher,
        # `canao deploy` without --teacher ships the teacher itself.
        "student": {**student, "config": _architecture(inputs["model"]), **stats,
                    "is_teacher": content_id(inputs["model"]) == content_id(inputs["teacher"])},
        # Relative to the deployment directory: a cached deployment is linked into each run's own.
        "front": FRONT_JSON if "search" in inputs else None,
        "device": device,
        "backend": choice,
        "speedup_vs_litert_fp32_teacher": speedup,
        **_finalized_budgets(inputs["model"]),
        **registry,
    }
    front = tuple(inputs["search"] / name for name in (FRONT_JSON, FRONT_PNG)) if "search" in inputs else ()
    return _write_deployment(out_dir, "deploy", cfg, inputs, deployment,
                             {"p50_ms": choice["p50_ms"], "p90_ms": choice["p90_ms"],
                              "speedup_vs_litert_fp32_teacher": speedup, "student": stats}, front)


def run_lm_teacher(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.lm.teacher import save_teacher
    shutil.rmtree(out_dir, ignore_errors=True)  # lm-teacher refuses an existing directory; a finished one is cached
    return save_teacher(cfg, out_dir)


def run_lm_data(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.lm.data import build_corpus
    shutil.rmtree(out_dir, ignore_errors=True)  # lm-data refuses an existing directory; a finished one is cached
    return build_corpus(cfg, out_dir)


def run_distill_lm(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.lm.distill import train_decoder_supernet
    return train_decoder_supernet(cfg, inputs["teacher"], inputs["data"], out_dir)


def run_latency_lm(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.lm.latency import fit_decoder_latency_model
    return fit_decoder_latency_model(cfg, context.device, out_dir, inputs["teacher"])


def run_search_lm(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.lm.search import search_lm
    shutil.rmtree(out_dir, ignore_errors=True)  # search-lm refuses an existing directory; a finished one is cached
    return search_lm(cfg, inputs["supernet"], inputs["latency"], out_dir,
                     on_trial=_trial_logger(context, "search-lm"))


def run_finalize_lm(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.lm.finalize import finalize_student
    return finalize_student(cfg, inputs["supernet"], inputs["search"], out_dir)


def run_compile_lm(cfg, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    from canao.lm.compile import compile_lm
    shutil.rmtree(out_dir, ignore_errors=True)  # compile-lm refuses an existing directory; a finished one is cached
    return compile_lm(inputs["model"], context.device, cfg, out_dir)


# What a generation student may be served by (canao serve's lm_backend), timed by benchmark-lm.
LM_SERVED_BACKENDS = ("llama.cpp", "torch")


def run_benchmark_lm(cfg: GenBenchConfig, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    """The generation student timed generating in each backend that may serve it (llama.cpp on
    its GGUF export, PyTorch), then llama.cpp on the teacher's GGUF file, the peer its speed-up
    is over, on the device at each of `cfg.contexts`."""
    from canao.lm.bench import bench_generation
    student = bench_generation(inputs["model"], None, context.device, LM_SERVED_BACKENDS, cfg)
    teacher = bench_generation(None, None, context.device, ("llama.cpp",), cfg)

    def fill(staging: Path) -> dict:
        write_records(student, staging / RECORDS)
        write_records(teacher, staging / TEACHER_RECORDS)
        metrics = {field: {f"{r.backend}_{r.context}": getattr(r, field) for r in student}
                   for field in ("ms_per_token", "time_to_first_token_ms")}
        metrics["teacher_llama_cpp_ms_per_token"] = {str(r.context): r.ms_per_token for r in teacher}
        return write_manifest(staging, "benchmark-lm", to_dict(cfg), metrics,
                              inputs={name: str(path) for name, path in inputs.items()},
                              config_hash=config_hash(cfg), device=context.device.key)

    return _write_through_staging(out_dir, fill)


def run_deploy_lm(cfg: LMDeployConfig, inputs: dict[str, Path], out_dir: Path, context: Context) -> dict:
    """The generation student's deployment: the fastest backend benchmark-lm timed (per token, at
    its longest context) of those that may serve it (llama.cpp only where finalize-lm scored the
    GGUF export within `cfg.perplexity_tol` of PyTorch), its speed-up over llama.cpp on the
    teacher's GGUF, the student pushed to the S3 registry and registered in MLflow under `cfg.alias`
    if its held-out perplexity passes the gate."""
    from canao.lm.gguf import exported_gguf, scored_within
    from canao.lm.teacher import teacher_gguf
    model = verify_stage(inputs["model"], "finalize-lm", "a finalized generation student (finalize-lm)")
    metrics = model["metrics"]
    benchmark = verify_stage(inputs["benchmark"], "benchmark-lm", "a generation benchmark (benchmark-lm)")
    device = benchmark["device"]
    rows, peer = (json.loads((inputs["benchmark"] / name).read_text())["records"]
                  for name in (RECORDS, TEACHER_RECORDS))
    context_len = max(r["context"] for r in rows)
    servable = [r for r in rows if r["context"] == context_len
                and (r["backend"] != "llama.cpp" or scored_within(metrics, cfg.perplexity_tol))]
    choice = min(servable, key=lambda r: r["ms_per_token"])
    teacher_ms = next(r["ms_per_token"] for r in peer if r["context"] == context_len)
    backend = {"backend": choice["backend"], "context": context_len, "ms_per_token": choice["ms_per_token"],
               "time_to_first_token_ms": choice["time_to_first_token_ms"],
               "candidates": [{k: r[k] for k in ("backend", "context", "ms_per_token", "time_to_first_token_ms")}
                              for r in rows]}
    speedup = teacher_ms / choice["ms_per_token"]
    gguf = exported_gguf(inputs["model"])
    student = {"dir": str(inputs["model"]), "gguf": str(gguf) if gguf else None, "config": model["config"]["subnet"],
               "backend": choice["backend"], "ms_per_token": choice["ms_per_token"],
               "time_to_first_token_ms": choice["time_to_first_token_ms"], "speedup_vs_llamacpp_teacher": speedup,
               **{k: metrics[k] for k in ("perplexity", "gguf_perplexity", "perplexity_vs_teacher",
                                          "greedy_agreement", "parameters")}}
    teacher = {"dir": str(inputs["teacher"]), "gguf": str(teacher_gguf()), "perplexity": metrics["teacher_perplexity"],
               "ms_per_token": teacher_ms}
    registry = _push_and_register(
        cfg, directory_files(inputs["model"], MODEL_DIR), {
            "metrics": {k: student[k] for k in ("perplexity", "gguf_perplexity", "greedy_agreement", "ms_per_token",
                                                "time_to_first_token_ms", "speedup_vs_llamacpp_teacher")},
            "backends": {device: backend},
            "lineage": {"teacher": {"dir": teacher["dir"], "content": content_id(inputs["teacher"])},
                        "pipeline_run": context.pipeline_run, "mlflow_run_id": context.parent_run_id},
        }, context, {"device": device, "backend": choice["backend"]},
        {"perplexity": student["perplexity"], "ms_per_token": choice["ms_per_token"]},
        tracking.Gate("perplexity", cfg.max_perplexity, "ms_per_token", cfg.max_ms_per_token))
    student["registry_uri"] = registry["registry_uri"]
    deployment = {
        "teacher": teacher,
        "student": student,
        # every finalized front point; finalize-lm finalizes the search's chosen one
        "students": [student],
        "device": device,
        "backend": backend,
        "speedup_vs_llamacpp_teacher": speedup,
        **registry,
    }
    return _write_deployment(out_dir, "deploy-lm", cfg, inputs, deployment,
                             {"ms_per_token": choice["ms_per_token"], "perplexity": student["perplexity"],
                              "speedup_vs_llamacpp_teacher": speedup})


Runner = Callable[[object, dict[str, Path], Path, Context], dict]

# stage -> (config name in configs/<profile>/, runner)
RUNNERS: dict[str, tuple[str, Runner]] = {
    "teacher": ("teacher", run_teacher),
    "distill": ("distill", run_distill),
    "latency": ("latency", run_latency),
    "search": ("search", run_search),
    "finalize": ("finalize", run_finalize),
    "compile": ("compile", run_compile),
    "benchmark": ("bench", run_benchmark),
    "deploy": ("deploy", run_deploy),
    # the generation chain
    "lm-teacher": ("lm-teacher", run_lm_teacher),
    "lm-data": ("lm-data", run_lm_data),
    "distill-lm": ("distill-lm", run_distill_lm),
    "latency-lm": ("latency-lm", run_latency_lm),
    "search-lm": ("search-lm", run_search_lm),
    "finalize-lm": ("finalize-lm", run_finalize_lm),
    "compile-lm": ("compile-lm", run_compile_lm),
    "benchmark-lm": ("bench-lm", run_benchmark_lm),
    "deploy-lm": ("deploy-lm", run_deploy_lm),
}


def execute(stage: str, profile: str, overrides: list[str], inputs: dict[str, str | Path], out_dir: str | Path,
            context: Context) -> tuple[dict, bool]:
    """Run (or reuse) `stage` into `out_dir`; returns its manifest and whether it came from the cache."""
    if stage not in RUNNERS:
        raise ValueError(f"stage: unknown {stage!r} (known: {', '.join(RUNNERS)})")
    config_name, runner = RUNNERS[stage]
    cfg = load_config(config_name, profile, overrides=overrides)
    inputs = {name: Path(path) for name, path in inputs.items()}
    cached_dir = cache_root() / stage / cache_key(stage, cfg, context.device, inputs)
    manifest = _finished(cached_dir)
    cached = manifest is not None
    if cached:
        print(f"{stage}: reusing {cached_dir} (same config and inputs)", flush=True)
    else:
        manifest = runner(cfg, inputs, cached_dir, context)
    _link_tree(cached_dir, Path(out_dir))
    if context.parent_run_id:
        tracking.log_stage(context.parent_run_id, stage, manifest, cached)
    return manifest, cached
