"""finalize: the front point with the highest F1 within the budget, extracted into a
standalone model, fine-tuned by distillation from the teacher, scored on dev-a, compiled
for the device and benchmarked against the teacher's shape on the peers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from canao.codesign.elastic import extract
from canao.codesign.kd import IMPORTANCE_FILE, TeacherTargets, fit
from canao.codesign.pareto import FRONT_JSON, choose
from canao.config import config_hash, from_dict, resolve_path, to_dict
from canao.hardware import torch_threads
from canao.lab import devices
from canao.manifest import reusable, sha256_file, verify_manifest, verify_stage, write_manifest, write_text_atomic
from canao.qa.augment import with_copies
from canao.qa.bench import bench
from canao.qa.compile import compile_model
from canao.qa.config import BenchConfig, CompileConfig, FinalizeConfig, SquadFeatureConfig
from canao.qa.data import Features, build_features, load_squad
from canao.qa.distill import (
    kept_targets_of,
    load_supernet,
    matched_layers,
    sorted_teacher,
    student_kd_loss,
    teacher_targets,
)
from canao.qa.model import load_qa_model, load_tokenizer
from canao.qa.predictor import QAPredictor, evaluate, load_artifact
from canao.qa.search import QA
from canao.qa.space import SubnetConfig

BASELINE_DIR = "baseline"  # the uniform baseline's model, inside the student's directory
STATS_FILE = "fit.json"  # a finished distillation's figures, beside its weights in the work directory


def finalize(cfg: FinalizeConfig, teacher_dir: str | Path, supernet_dir: str | Path, search_dir: str | Path,
             out_dir: str | Path) -> dict:
    """The student model directory (save_pretrained layout + manifest with dev EM/F1); beside it,
    in `BASELINE_DIR`, the search's uniform baseline finalized alike, so its figures compare."""
    teacher_dir, supernet_dir, search_dir, out_dir = map(Path, (teacher_dir, supernet_dir, search_dir, out_dir))
    search_manifest = verify_stage(search_dir, "search", "a search")
    result = json.loads((search_dir / FRONT_JSON).read_text())
    point = choose(result, QA)
    subnet = SubnetConfig.from_dict(point["subnet"])
    fingerprint = config_hash(cfg) + "-" + search_manifest["files"][FRONT_JSON][:16]
    existing = reusable(out_dir, fingerprint, "student")
    if existing is not None:
        return existing
    torch_threads(cfg.train.threads)
    supernet, supernet_manifest = load_supernet(supernet_dir)
    features_cfg = from_dict(SquadFeatureConfig, supernet_manifest["config"]["features"], "features.")
    teacher = sorted_teacher(teacher_dir, load_file(supernet_dir / IMPORTANCE_FILE))
    tokenizer = load_tokenizer(teacher_dir)
    train_file, eval_file = resolve_path(cfg.data.train_file), resolve_path(cfg.data.eval_file)
    features = build_features(with_copies(load_squad(train_file, cfg.data.train_questions), cfg.augment),
                              tokenizer, features_cfg)
    chosen = {"student": (subnet, out_dir, point)}
    if cfg.baseline and "baseline" in result:
        chosen["baseline"] = (SubnetConfig.from_dict(result["baseline"]["subnet"]), out_dir / BASELINE_DIR,
                              result["baseline"])
    teacher_layers = supernet.shape.num_layers
    work_dir = out_dir / "checkpoints"
    # One teacher pass serves every student: the hidden states any of them learns from.
    hidden = sorted({i for s, _, _ in chosen.values()
                     for i in matched_layers(s.layer_indices(teacher_layers))}) if cfg.kd.hidden_weight else []
    targets = TeacherTargets.compute(
        work_dir / "teacher-targets", fingerprint, features.lengths(),
        lambda index: teacher_targets(teacher, features.model_inputs(index), hidden),
        cfg.train.eval_batch_size, cfg.train.bf16)
    eval_examples = load_squad(eval_file, cfg.data.eval_questions)
    teacher_metrics, _ = evaluate(QAPredictor(teacher, tokenizer, features_cfg, cfg.train.eval_batch_size),
                                  eval_examples)
    scores = {}
    for name, (student_subnet, directory, origin) in chosen.items():
        print(f"finalize: {name} {origin['label']} (search F1 {origin['f1']:.2f}); fine-tuning on "
              f"{len(features)} windows", flush=True)
        student, stats = _distilled(cfg, extract(supernet, student_subnet),
                                    student_subnet.layer_indices(teacher_layers), features, targets,
                                    work_dir / name, fingerprint, name)
        student.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        scored, _ = evaluate(QAPredictor(student, tokenizer, features_cfg, cfg.train.eval_batch_size), eval_examples)
        scores[name] = {**scored, **stats, "f1_drop": teacher_metrics["f1"] - scored["f1"],
                        "subnet": origin["subnet"], "params": origin["params"], "search_f1": origin["f1"]}
    shutil.rmtree(work_dir, ignore_errors=True)
    metrics = {**scores.pop("student"), "teacher_exact_match": teacher_metrics["exact_match"],
               "teacher_f1": teacher_metrics["f1"], **scores}
    if cfg.benchmark:
        metrics.update(_benchmark(cfg, out_dir, teacher_dir, search_dir, result, eval_examples, metrics))
    inputs = {"teacher": str(teacher_dir.resolve()), "supernet": str(supernet_dir.resolve()),
              "search": str(search_dir.resolve()),
              "train_file": {"path": str(train_file), "sha256": sha256_file(train_file)},
              "eval_file": {"path": str(eval_file), "sha256": sha256_file(eval_file)}}
    # `features` in the config: QAPredictor.from_dir windows inputs the way the student was trained.
    config = {**to_dict(cfg), "features": to_dict(features_cfg)}
    if "baseline" in metrics:  # a model directory of its own, loadable like the student
        write_manifest(out_dir / BASELINE_DIR, "finalize", {**config, "subnet": metrics["baseline"]["subnet"]},
                       metrics["baseline"], inputs, config_hash=fingerprint)
    return write_manifest(out_dir, "finalize", {**config, "subnet": point["subnet"]}, metrics, inputs,
                          config_hash=fingerprint)


def _distilled(cfg: FinalizeConfig, student: torch.nn.Module, layer_map: list[int], features: Features,
               targets: TeacherTargets, work_dir: Path, fingerprint: str, name: str) -> tuple[torch.nn.Module, dict]:
    """`student` fine-tuned by distillation from the kept teacher `targets`, and `fit`'s figures.
    Kept in `work_dir` once done, so a finalize resumed after it skips it."""
    done = work_dir / "distilled"
    if (done / STATS_FILE).is_file():
        kept = json.loads((done / STATS_FILE).read_text())
        if kept["fingerprint"] == fingerprint:
            return load_qa_model(done), kept["stats"]

    loss_fn = student_kd_loss(kept_targets_of(targets), layer_map,
                              cfg.kd)
    stats = fit(student, features, loss_fn, cfg.train, cfg.seed, work_dir, fingerprint, desc=name,
                lengths=features.lengths())
    student.save_pretrained(done)
    write_text_atomic(done / STATS_FILE, json.dumps({"fingerprint": fingerprint, "stats": stats}))
    return student, stats


def _benchmark(cfg: FinalizeConfig, out_dir: Path, teacher_dir: Path, search_dir: Path, result: dict,
               eval_examples: list, metrics: dict) -> dict:
    """Compile the student (into out_dir/compiled), the baseline if there is one (into its own
    compiled/) and the teacher (a scratch directory, removed afterwards) for the search's device
    with the latency stage's compiler settings, and time them back to back: two timings taken
    at different times on a shared machine are not comparable, so a speed-up never mixes them.
    Each student's fastest backend is then scored on `eval_examples` as compiled (an int8 backend
    loses accuracy of its own), so a speed-up comes with the F1 of what runs at that speed."""
    search_manifest = verify_manifest(search_dir)
    latency_manifest = verify_manifest(search_manifest["inputs"]["latency"])
    compile_cfg = from_dict(CompileConfig, latency_manifest["config"]["compile"], "compile.")
    bench_cfg = from_dict(BenchConfig, latency_manifest["config"]["bench"], "bench.")
    compile_cfg = dataclasses.replace(compile_cfg, peers=tuple(b for b in cfg.bench_backends if b != "tvm"))
    device = devices.get_device(result["device"])
    students = {"student": out_dir} | ({"baseline": out_dir / BASELINE_DIR} if "baseline" in metrics else {})
    compiled = {name: compile_model(d, device, compile_cfg, d / "compiled") for name, d in students.items()}
    scratch = out_dir / "teacher-compiled"
    try:
        compile_model(teacher_dir, device, compile_cfg, scratch)
        teacher_ms = {r.backend: r.p50_ms for r in bench(scratch, teacher_dir, device, cfg.bench_backends,
                                                                bench_cfg)}
        student_ms = {name: {r.backend: r.p50_ms for r in bench(d / "compiled", d, device, cfg.bench_backends,
                                                                bench_cfg)} for name, d in students.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    figures = {}
    for name, directory in students.items():
        best_ms, best_backend = min((v, b) for b, v in student_ms[name].items())
        predictor, _, _ = load_artifact(directory / "compiled", compiled[name], best_backend, device.threads)
        compiled_metrics, _ = evaluate(predictor, eval_examples)
        figures[name] = {"ms": student_ms[name], "best_backend": best_backend,
                         "best_backend_f1": compiled_metrics["f1"],
                         "best_backend_exact_match": compiled_metrics["exact_match"]}
        if "litert" in teacher_ms:
            figures[name]["speedup_vs_teacher_litert"] = teacher_ms["litert"] / best_ms
    out = {"device": device.key, "seq_len": compile_cfg.seq_len, "teacher_ms": teacher_ms,
           **{f"student_{k}": v for k, v in figures.pop("student").items()}}
    if "baseline" in figures:
        out["baseline"] = {**metrics["baseline"], **figures["baseline"]}
    # the student's speed-up keeps its name of before baselines (search-report and deploy read it)
    if "student_speedup_vs_teacher_litert" in out:
        out["speedup_vs_teacher_litert"] = out.pop("student_speedup_vs_teacher_litert")
    return out
