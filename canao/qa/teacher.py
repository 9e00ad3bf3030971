"""teacher: the QA teacher fine-tuned on the SQuAD training subset with the span loss (the
resumable canao.codesign.kd.fit loop) and scored on the evaluation file.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from canao.codesign.kd import fit
from canao.config import config_hash, resolve_path, to_dict
from canao.hardware import torch_threads
from canao.manifest import reusable, sha256_file, write_manifest
from canao.qa.config import TeacherConfig
from canao.qa.data import Features, build_features, load_squad
from canao.qa.model import (
    MINILM_NAME,
    init_qa_model,
    load_tokenizer,
    minilm_dir,
)
from canao.qa.predictor import QAPredictor, evaluate


def span_loss(model: torch.nn.Module, features: Features, index: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the gold start and end tokens, averaged."""
    out = model(**features.model_inputs(index), start_positions=features.start_positions[index],
                end_positions=features.end_positions[index])
    return out.loss


def train_teacher(cfg: TeacherConfig, out_dir: str | Path) -> dict:
    """Fine-tune the QA teacher into `out_dir` (save_pretrained layout + manifest.json).

    A directory that already holds a teacher made with the same config is reused as it
    is; one made with another config is an error, so nothing stored is overwritten.
    """
    out_dir = Path(out_dir)
    fingerprint = config_hash(cfg)
    existing = reusable(out_dir, fingerprint, "teacher")
    if existing is not None:
        return existing
    train_file, eval_file = resolve_path(cfg.data.train_file), resolve_path(cfg.data.eval_file)
    train_examples = load_squad(train_file, cfg.data.train_questions)
    eval_examples = load_squad(eval_file, cfg.data.eval_questions)
    torch_threads(cfg.train.threads)

    tokenizer = load_tokenizer()
    model = init_qa_model(cfg.init, cfg.random_shape, cfg.seed)
    features = build_features(train_examples, tokenizer, cfg.features)
    print(f"teacher: {len(train_examples)} questions -> {len(features)} training windows", flush=True)
    work_dir = out_dir / "checkpoints"
    stats = fit(model, features, span_loss, cfg.train, cfg.seed, work_dir, fingerprint, desc="teacher",
                lengths=features.lengths())

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    predictor = QAPredictor(model, tokenizer, cfg.features, cfg.train.eval_batch_size)
    started = time.perf_counter()
    metrics, _ = evaluate(predictor, eval_examples)
    metrics.update(stats, eval_seconds=round(time.perf_counter() - started, 1), train_windows=len(features))
    shutil.rmtree(work_dir, ignore_errors=True)
    inputs = {
        "init": MINILM_NAME if cfg.init == "minilm" else "random",
        "init_sha256": sha256_file(minilm_dir() / "model.safetensors") if cfg.init == "minilm" else None,
        "train_file": {"path": str(train_file), "sha256": sha256_file(train_file)},
        "eval_file": {"path": str(eval_file), "sha256": sha256_file(eval_file)},
    }
    return write_manifest(out_dir, "teacher", to_dict(cfg), metrics, inputs, config_hash=fingerprint)
