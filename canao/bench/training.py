"""`canao bench-kd`: the training throughput of finalize's distillation, two recipes side by side
in one process on the same windows: the teacher run at every step on uniformly random batches (the
recipe before the teacher's outputs were kept), and the teacher's outputs computed once
(`TeacherTargets`) with batches pooled by length (`train.length_pool`). Windows per second of each
fit, and the one-off cost of the kept outputs, measured on the machine it runs on.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path

import torch

from canao import hardware
from canao.codesign.elastic import extract
from canao.codesign.kd import TeacherTargets, fit
from canao.config import TrainConfig, resolve_path
from canao.qa.config import QAKDConfig, SquadDataConfig, SquadFeatureConfig
from canao.qa.data import build_features, load_squad
from canao.qa.distill import kept_targets_of, student_kd_loss, target_layers, teacher_targets
from canao.qa.model import Supernet, load_qa_model, load_tokenizer
from canao.qa.space import SubnetConfig


def kd_throughput(teacher_dir: Path, subnet: SubnetConfig, questions: int, features_cfg: SquadFeatureConfig,
                  train: TrainConfig, kd: QAKDConfig, work_dir: Path) -> dict:
    """Windows/s of one epoch of KD of `subnet` (extracted from the teacher's own weights) on the first
    `questions` training questions, by both recipes (the module doc); `train.length_pool` is the
    pool of the second."""
    hardware.torch_threads(train.threads)
    teacher = load_qa_model(teacher_dir).requires_grad_(False)
    features = build_features(load_squad(resolve_path(SquadDataConfig.train_file), questions),
                              load_tokenizer(teacher_dir), features_cfg)
    layer_map = subnet.layer_indices(teacher.config.num_hidden_layers)
    hidden = target_layers([layer_map], kd, teacher.config.num_hidden_layers)
    supernet = Supernet(copy.deepcopy(teacher))

    def run(name: str, targets_of, pool: int) -> dict:
        stats = fit(extract(supernet, subnet), features, student_kd_loss(targets_of, layer_map, kd, teacher),
                    dataclasses.replace(train, epochs=1, length_pool=pool), 0, work_dir / name, name, desc=name,
                    lengths=features.lengths())
        return {"windows_per_s": stats["windows_per_s"], "seconds": stats["train_seconds"], "steps": stats["steps"]}

    def fresh(index, inputs):
        with torch.no_grad():
            return teacher_targets(teacher, inputs, hidden)

    try:
        before = run("teacher-every-step", fresh, 0)
        started = time.perf_counter()
        kept = TeacherTargets.compute(work_dir / "targets", "bench", features.lengths(),
                                      lambda index: teacher_targets(teacher, features.model_inputs(index), hidden),
                                      train.eval_batch_size, train.bf16)
        targets_seconds = time.perf_counter() - started
        after = run("kept-targets", kept_targets_of(kept),
                    train.length_pool)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return {"hardware": hardware.host().label(), "windows": len(features),
            "subnet": subnet.label(), "seq_len": features_cfg.max_seq_len, "length_pool": train.length_pool,
            "teacher_every_step": before, "kept_targets": {**after, "targets_seconds": round(targets_seconds, 1)},
            "speedup_per_epoch": round(after["windows_per_s"] / before["windows_per_s"], 2),
            "speedup_first_epoch_with_targets": round(before["seconds"] / (after["seconds"] + targets_seconds), 2)}


def training_section(result: dict) -> str:
    """BENCHMARKS.md's distillation-throughput section for a `kd_throughput` result."""
    before, after = result["teacher_every_step"], result["kept_targets"]
    return "\n".join([
        f"Measured on {result['hardware']} by `{result['command']}`: one epoch of finalize's KD of "
        f"{result['subnet']} over {result['windows']} windows of up to {result['seq_len']} tokens, both recipes "
        "one after the other in one process.", "",
        "| recipe | steps | seconds | windows/s |", "|---|---|---|---|",
        f"| teacher run at every step, random batches (before) | {before['steps']} | {before['seconds']} | "
        f"{before['windows_per_s']} |",
        f"| teacher's outputs kept, batches pooled by length ({result['length_pool']} batches a pool) | "
        f"{after['steps']} | {after['seconds']} | {after['windows_per_s']} |", "",
        f"Per epoch: **{result['speedup_per_epoch']}x** the windows/s. Computing the kept outputs took "
        f"{after['targets_seconds']} s once; with it, the first epoch is {result['speedup_first_epoch_with_targets']}x "
        "as fast as before, and every further epoch gains the full factor.", ""])
