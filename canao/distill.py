"""Training: the resumable loop shared by every stage that trains, and the QA teacher.

The loop checkpoints model, optimizer, schedule, step and RNG state every
`checkpoint_every` steps; a run killed half-way restarts from its last checkpoint and
sees the same batches in the same order as an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from canao.apps.qa import QAPredictor, evaluate
from canao.config import TeacherConfig, TrainConfig, config_hash, resolve_path, to_dict
from canao.data.squad import Features, build_features, load_squad
from canao.manifest import read_manifest, sha256_file, write_manifest
from canao.models.bert_qa import MINILM_NAME, init_qa_model, load_tokenizer, minilm_dir

CHECKPOINT = "checkpoint.pt"

# loss_fn(model, features, batch_index) -> scalar loss of that batch
LossFn = Callable[[torch.nn.Module, Features, torch.Tensor], torch.Tensor]


def fit(model: torch.nn.Module, features: Features, loss_fn: LossFn, cfg: TrainConfig, seed: int,
        work_dir: Path, fingerprint: str, desc: str = "train") -> dict:
    """Train `model` on `features`, resuming from `work_dir`'s checkpoint if one exists."""
    steps_per_epoch = math.ceil(len(features) / cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim == 1 else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )
    schedule = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    step, seconds, loss_ema = 0, 0.0, None
    checkpoint = work_dir / CHECKPOINT
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                f"{checkpoint}: a checkpoint of another config or input; remove it or choose another --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        step, seconds, loss_ema = state["step"], state["seconds"], state["loss_ema"]
        print(f"resuming from {checkpoint} at step {step}/{total_steps}", flush=True)

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    started = time.perf_counter() - seconds
    order = None
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if in_epoch == 0 or order is None:
            order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed + epoch))
        index = order[in_epoch * cfg.batch_size : (in_epoch + 1) * cfg.batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = loss_fn(model, features, index)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", epoch=epoch)
        if step % cfg.checkpoint_every == 0 and step < total_steps:
            _save_checkpoint(checkpoint, {
                "fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "rng": torch.get_rng_state(), "step": step,
                "seconds": time.perf_counter() - started, "loss_ema": loss_ema,
            })
    bar.close()
    model.eval()
    return {"steps": total_steps, "train_seconds": round(time.perf_counter() - started, 1),
            "final_loss": round(loss_ema, 4)}


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    existing = read_manifest(out_dir)
    if existing is not None:
        if existing.get("config_hash") == fingerprint:
            print(f"{out_dir}: teacher with this config already trained; reusing it", flush=True)
            return existing
        raise FileExistsError(f"{out_dir}: holds a model made with another config; choose another --out")
    train_file, eval_file = resolve_path(cfg.data.train_file), resolve_path(cfg.data.eval_file)
    train_examples = load_squad(train_file, cfg.data.train_questions)
    eval_examples = load_squad(eval_file, cfg.data.eval_questions)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    tokenizer = load_tokenizer()
    model = init_qa_model(cfg.init, cfg.random_shape, cfg.seed)
    features = build_features(train_examples, tokenizer, cfg.features)
    print(f"teacher: {len(train_examples)} questions -> {len(features)} training windows", flush=True)
    work_dir = out_dir / "checkpoints"
    stats = fit(model, features, span_loss, cfg.train, cfg.seed, work_dir, fingerprint, desc="teacher")

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
