"""`canao bench-students`: which students are worth searching for, by measurement. Each candidate
subnet is extracted from the teacher (units sorted by importance, as the supernet sorts them),
distilled for the same short budget from the teacher's outputs kept once for all of them, and
scored on dev-a; a supernet, if given, scores each candidate as the search would (the proxy),
so the proxy's ranking can be held against the finalized one (Spearman). A one-off study beside
the chain: it chooses the search space and checks the proxy, it deploys nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path

from scipy.stats import spearmanr

from canao import hardware
from canao.codesign.elastic import extract
from canao.codesign.kd import TeacherTargets, fit
from canao.config import config_hash, resolve_path
from canao.manifest import sha256_file
from canao.qa.augment import with_copies
from canao.qa.config import BertShape, FinalizeConfig, SpaceConfig, SquadFeatureConfig
from canao.qa.data import build_features, load_squad
from canao.qa.distill import kept_targets_of, load_supernet, student_kd_loss, target_layers, teacher_targets
from canao.qa.model import Supernet, importance, load_qa_model, load_tokenizer, sort_by_importance
from canao.qa.predictor import QAPredictor, evaluate
from canao.qa.space import SearchSpace, SubnetConfig, flops, params


def study(teacher_dir: Path, subnets: list[SubnetConfig], space: SpaceConfig, cfg: FinalizeConfig,
          features_cfg: SquadFeatureConfig, importance_batches: int, work_dir: Path,
          supernet_dir: Path | None = None) -> dict:
    """Every subnet of `subnets` (each in `space` over the teacher) distilled by `cfg` (its data,
    augmentation, KD and train settings: set `train.epochs` and `data.train_questions` for the
    budget) and scored on `cfg.data`'s dev-a questions; with `supernet_dir`, also each subnet's F1
    as a slice of that supernet."""
    teacher = load_qa_model(teacher_dir)
    shape = BertShape.of(teacher.config)
    allowed = SearchSpace(space, shape)
    for i, subnet in enumerate(subnets):
        try:
            allowed.validate(subnet)
        except ValueError as e:
            raise ValueError(f"subnets[{i}]: {e}") from None
    hardware.torch_threads(cfg.train.threads)
    tokenizer = load_tokenizer(teacher_dir)
    features = build_features(with_copies(load_squad(resolve_path(cfg.data.train_file), cfg.data.train_questions),
                                          cfg.augment), tokenizer, features_cfg)
    # Units sorted as a supernet sorts them, so a subnet keeps the most important heads and neurons.
    sort_by_importance(teacher, importance(teacher, features, importance_batches, cfg.train.batch_size))
    teacher.requires_grad_(False)
    hidden = target_layers([s.layer_indices(shape.num_layers) for s in subnets], cfg.kd, shape.num_layers)
    eval_examples = load_squad(resolve_path(cfg.data.eval_file), cfg.data.eval_questions)
    # What the kept targets and each student's checkpoints were made from: a study killed and run
    # again resumes them only if nothing changed.
    fingerprint = "-".join([sha256_file(teacher_dir / "model.safetensors")[:16], config_hash(cfg),
                            config_hash(features_cfg), str(importance_batches), ",".join(map(str, hidden))])
    supernet = Supernet(copy.deepcopy(teacher))
    proxy = load_supernet(supernet_dir)[0] if supernet_dir else None
    rows = []
    try:
        started = time.perf_counter()
        targets = TeacherTargets.compute(work_dir / "targets", fingerprint, features.lengths(),
                                         lambda index: teacher_targets(teacher, features.model_inputs(index), hidden),
                                         cfg.train.eval_batch_size, cfg.train.bf16)
        targets_seconds = round(time.perf_counter() - started, 1)
        teacher_scores, _ = evaluate(QAPredictor(teacher, tokenizer, features_cfg, cfg.train.eval_batch_size),
                                     eval_examples, progress=False)
        for n, subnet in enumerate(subnets):
            layer_map = subnet.layer_indices(shape.num_layers)
            loss_fn = student_kd_loss(kept_targets_of(targets), layer_map, cfg.kd, teacher)
            student = extract(supernet, subnet)
            stats = fit(student, features, loss_fn, cfg.train, cfg.seed, work_dir / f"student-{n}",
                        f"{fingerprint}-{config_hash(subnet)}",
                        desc=f"student {n + 1}/{len(subnets)}", lengths=features.lengths())
            scores, _ = evaluate(QAPredictor(student, tokenizer, features_cfg, cfg.train.eval_batch_size),
                                 eval_examples, progress=False)
            kept = dataclasses.replace(subnet, layers=tuple(layer_map))  # recorded whatever the space's rule
            row = {"subnet": kept.to_dict(), "label": kept.label(), "params": params(subnet, shape, 0, 0),
                   "flops": flops(subnet, shape, features_cfg.max_seq_len), "f1": round(scores["f1"], 2),
                   "exact_match": round(scores["exact_match"], 2), "steps": stats["steps"],
                   "train_seconds": stats["train_seconds"], "final_loss_terms": stats["final_loss_terms"]}
            if proxy is not None:
                sliced, _ = evaluate(QAPredictor(extract(proxy, subnet), tokenizer, features_cfg,
                                                 cfg.train.eval_batch_size), eval_examples, progress=False)
                row["supernet_f1"] = round(sliced["f1"], 2)
            print(f"bench-students: {row['label']}: F1 {row['f1']}" +
                  (f" (supernet slice {row['supernet_f1']})" if proxy is not None else ""), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result = {"hardware": hardware.host().label(), "teacher": str(teacher_dir.resolve()),
              "teacher_f1": round(teacher_scores["f1"], 2), "train_windows": len(features),
              "eval_questions": len(eval_examples), "targets_seconds": targets_seconds,
              "train": dataclasses.asdict(cfg.train), "kd": dataclasses.asdict(cfg.kd),
              "augment": dataclasses.asdict(cfg.augment), "students": rows}
    if proxy is not None and len(rows) >= 2:
        rho = spearmanr([r["supernet_f1"] for r in rows], [r["f1"] for r in rows]).statistic
        result["spearman_supernet_vs_distilled"] = round(float(rho), 3)
    return result


def students_section(result: dict) -> str:
    """BENCHMARKS.md's section for a `study` result: one row per candidate, best F1 first."""
    proxy = "spearman_supernet_vs_distilled" in result
    train = result["train"]
    lines = [
        f"Measured on {result['hardware']} by `{result['command']}`: every candidate extracted from the teacher "
        f"(F1 {result['teacher_f1']} on the same questions), distilled alike for {result['students'][0]['steps']} "
        f"steps of {train['batch_size']} windows ({result['train_windows']} windows, lr {train['learning_rate']}), "
        f"scored on the first {result['eval_questions']} dev-a questions.", "",
        "| student | params | GFLOPs | F1 | EM | KD seconds |" + (" supernet slice F1 |" if proxy else ""),
        "|---|---|---|---|---|---|" + ("---|" if proxy else "")]
    for row in sorted(result["students"], key=lambda r: -r["f1"]):
        lines.append(f"| {row['label']} | {row['params'] / 1e6:.1f} M | {row['flops'] / 1e9:.2f} | {row['f1']} | "
                     f"{row['exact_match']} | {row['train_seconds']} |" + (f" {row['supernet_f1']} |" if proxy else ""))
    if proxy:
        lines += ["", f"Spearman rank correlation of the supernet's F1 with the distilled F1: "
                      f"**{result['spearman_supernet_vs_distilled']}**."]
    return "\n".join(lines + [""])
