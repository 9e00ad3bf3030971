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

from canao.bench.protocol import bench
from canao.codesign.elastic import extract
from canao.codesign.kd import IMPORTANCE_FILE, fit
from canao.codesign.pareto import FRONT_JSON, choose
from canao.compile.relax import compile_model
from canao.config import config_hash, from_dict, resolve_path, to_dict
from canao.hardware import torch_threads
from canao.lab import devices
from canao.manifest import reusable, sha256_file, verify_manifest, verify_stage, write_manifest
from canao.qa.config import BenchConfig, CompileConfig, FinalizeConfig, SquadFeatureConfig
from canao.qa.data import build_features, load_squad
from canao.qa.distill import kd_loss, load_supernet, sorted_teacher
from canao.qa.model import load_tokenizer
from canao.qa.predictor import QAPredictor, evaluate, load_artifact
from canao.qa.search import QA
from canao.qa.space import SubnetConfig


def finalize(cfg: FinalizeConfig, teacher_dir: str | Path, supernet_dir: str | Path, search_dir: str | Path,
             out_dir: str | Path) -> dict:
    """The student model directory (save_pretrained layout + manifest with dev EM/F1)."""
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
    student = extract(supernet, subnet)
    tokenizer = load_tokenizer(teacher_dir)
    train_file, eval_file = resolve_path(cfg.data.train_file), resolve_path(cfg.data.eval_file)
    features = build_features(load_squad(train_file, cfg.data.train_questions), tokenizer, features_cfg)
    layer_map = subnet.layer_indices(supernet.shape.num_layers)

    def loss_fn(model, feats, index):
        inputs = feats.model_inputs(index)
        with torch.no_grad():
            target = teacher(**inputs, output_hidden_states=True)
        gold = (feats.start_positions[index], feats.end_positions[index])
        return kd_loss(model(**inputs, output_hidden_states=True), target, layer_map, cfg.kd, gold)

    print(f"finalize: {point['label']} (search F1 {point['f1']:.2f}); fine-tuning on {len(features)} windows",
          flush=True)
    work_dir = out_dir / "checkpoints"
    stats = fit(student, features, loss_fn, cfg.train, cfg.seed, work_dir, fingerprint, desc="student")
    shutil.rmtree(work_dir, ignore_errors=True)
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    eval_examples = load_squad(eval_file, cfg.data.eval_questions)
    metrics, _ = evaluate(QAPredictor(student, tokenizer, features_cfg, cfg.train.eval_batch_size), eval_examples)
    teacher_metrics, _ = evaluate(QAPredictor(teacher, tokenizer, features_cfg, cfg.train.eval_batch_size),
                                  eval_examples)
    metrics.update(stats, teacher_exact_match=teacher_metrics["exact_match"], teacher_f1=teacher_metrics["f1"],
                   f1_drop=teacher_metrics["f1"] - metrics["f1"], subnet=point["subnet"],
                   params=point["params"], search_f1=point["f1"])
    if cfg.benchmark:
        metrics.update(_benchmark(cfg, out_dir, teacher_dir, search_dir, result, eval_examples))
    inputs = {"teacher": str(teacher_dir.resolve()), "supernet": str(supernet_dir.resolve()),
              "search": str(search_dir.resolve()),
              "train_file": {"path": str(train_file), "sha256": sha256_file(train_file)},
              "eval_file": {"path": str(eval_file), "sha256": sha256_file(eval_file)}}
    # `features` in the config: QAPredictor.from_dir windows inputs the way the student was trained.
    config = {**to_dict(cfg), "features": to_dict(features_cfg), "subnet": point["subnet"]}
    return write_manifest(out_dir, "finalize", config, metrics, inputs, config_hash=fingerprint)


def _benchmark(cfg: FinalizeConfig, out_dir: Path, teacher_dir: Path, search_dir: Path, result: dict,
               eval_examples: list) -> dict:
    """Compile the student for the search's device (into out_dir/compiled) and the teacher (a
    scratch directory, removed afterwards) with the latency stage's compiler settings, and
    time both back to back: two timings taken at different times on a shared machine are not
    comparable, so the speed-up never mixes them. The student's fastest backend is then scored
    on `eval_examples` as compiled (an int8 backend loses accuracy of its own), so the speed-up
    comes with the F1 of what runs at that speed."""
    search_manifest = verify_manifest(search_dir)
    latency_manifest = verify_manifest(search_manifest["inputs"]["latency"])
    compile_cfg = from_dict(CompileConfig, latency_manifest["config"]["compile"], "compile.")
    bench_cfg = from_dict(BenchConfig, latency_manifest["config"]["bench"], "bench.")
    compile_cfg = dataclasses.replace(compile_cfg, peers=tuple(b for b in cfg.bench_backends if b != "tvm"))
    device = devices.get_device(result["device"])
    student_manifest = compile_model(out_dir, device, compile_cfg, out_dir / "compiled")
    scratch = out_dir / "teacher-compiled"
    try:
        compile_model(teacher_dir, device, compile_cfg, scratch)
        teacher_ms = {r.backend: r.p50_ms for r in bench(scratch, teacher_dir, device, cfg.bench_backends,
                                                                bench_cfg)}
        student_ms = {r.backend: r.p50_ms for r in bench(out_dir / "compiled", out_dir, device,
                                                                cfg.bench_backends, bench_cfg)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best_ms, best_backend = min((v, b) for b, v in student_ms.items())
    predictor, _, _ = load_artifact(out_dir / "compiled", student_manifest, best_backend, device.threads)
    compiled_metrics, _ = evaluate(predictor, eval_examples)
    out = {"device": device.key, "seq_len": compile_cfg.seq_len, "student_ms": student_ms, "teacher_ms": teacher_ms,
           "student_best_backend": best_backend, "student_best_backend_f1": compiled_metrics["f1"],
           "student_best_backend_exact_match": compiled_metrics["exact_match"]}
    if "litert" in teacher_ms:
        out["speedup_vs_teacher_litert"] = teacher_ms["litert"] / best_ms
    return out
