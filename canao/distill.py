"""Training: the resumable loop shared by every stage that trains, the QA teacher, and the
elastic supernet distilled from it (the pipeline's pretraining-distill stage).

The loop checkpoints model, optimizer, schedule, step and RNG state every
`checkpoint_every` steps; a run killed half-way restarts from its last checkpoint and
sees the same batches in the same order as an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import time
from collections.abc import Callable, Sized
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from canao.apps.qa import QAPredictor, evaluate
from canao.config import DistillConfig, KDConfig, TeacherConfig, TrainConfig, config_hash, resolve_path, to_dict
from canao.data.squad import Features, build_features, load_squad
from canao.hardware import autocast_bf16, torch_threads
from canao.manifest import reusable, sha256_file, verify_manifest, verify_stage, write_atomic, write_manifest
from canao.models.bert_qa import MINILM_NAME, init_qa_model, load_qa_model, load_tokenizer, minilm_dir
from canao.models.supernet import Supernet, importance, sort_by_importance
from canao.space import SearchSpace, TeacherShape

CHECKPOINT = "checkpoint.pt"
IMPORTANCE_FILE = "importance.safetensors"  # the scores that sorted the supernet: re-sorts the teacher alike
SUPERNET_DIR = "supernet"

# loss_fn(model, examples, batch_index) -> scalar loss of that batch
LossFn = Callable[[torch.nn.Module, Sized, torch.Tensor], torch.Tensor]


def fit(model: torch.nn.Module, features: Sized, loss_fn: LossFn, cfg: TrainConfig, seed: int,
        work_dir: Path, fingerprint: str, desc: str = "train") -> dict:
    """Train `model` on `features` (QA windows, LM token windows: anything with a length whose
    batches `loss_fn` picks by index), resuming from `work_dir`'s checkpoint if one exists."""
    steps_per_epoch = math.ceil(len(features) / cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )
    schedule = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    step, seconds, loss_ema = 0, 0.0, None
    checkpoint = work_dir / CHECKPOINT
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False, map_location="cpu")
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

    device_type = next(model.parameters()).device.type  # autocast where the model lives: cpu or cuda
    bf16, why = autocast_bf16(cfg.bf16, device_type)
    precision = "bf16" if bf16 else "fp32"
    print(f"{desc}: {precision} autocast, {torch.get_num_threads()} threads ({why})", flush=True)
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"{desc} [{precision}]", unit="step", dynamic_ncols=True)
    started = time.perf_counter() - seconds
    order = None
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if in_epoch == 0 or order is None:
            order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed + epoch))
        index = order[in_epoch * cfg.batch_size : (in_epoch + 1) * cfg.batch_size]
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
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
            "final_loss": round(loss_ema, 4), "precision": {"bf16": cfg.bf16, "autocast": precision, "why": why},
            "threads": torch.get_num_threads()}


def _save_checkpoint(path: Path, state: dict) -> None:
    write_atomic(path, lambda tmp: torch.save(state, tmp))


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


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence of the student's distributions from the teacher's at `temperature`, scaled
    by T^2 so its gradients keep their size whatever T (Hinton et al.); the last dimension is
    the distribution, the mean is over every other position."""
    t, classes = temperature, student_logits.shape[-1]
    return torch.nn.functional.kl_div(
        torch.log_softmax(student_logits.float().reshape(-1, classes) / t, dim=-1),
        torch.log_softmax(teacher_logits.float().reshape(-1, classes) / t, dim=-1),
        log_target=True, reduction="batchmean") * t * t


def hidden_mse(student_hidden: tuple, teacher_hidden: tuple, layer_map: list[int]) -> torch.Tensor:
    """Mean over the student's embeddings and layers of the MSE against the teacher's embeddings and
    the teacher layer each stands for (`layer_map[j]`), on the student's width (its channels are
    the teacher's first ones)."""
    width = student_hidden[0].shape[-1]
    pairs = zip(student_hidden, [0] + [i + 1 for i in layer_map], strict=True)
    return sum(torch.nn.functional.mse_loss(s.float(), teacher_hidden[i][..., :width].float())
               for s, i in pairs) / (len(layer_map) + 1)


def kd_loss(student_out, teacher_out, layer_map: list[int], cfg: KDConfig, gold: tuple | None = None) -> torch.Tensor:
    """Knowledge distillation of a QA (sub)network from the teacher: `soft_kl` of the start and
    end distributions (averaged), `hidden_mse` weighted by `cfg.hidden_weight`, and optionally
    the gold span's cross-entropy (`gold`: start and end positions)."""
    loss = (soft_kl(student_out.start_logits, teacher_out.start_logits, cfg.temperature)
            + soft_kl(student_out.end_logits, teacher_out.end_logits, cfg.temperature)) / 2
    if cfg.hidden_weight:
        loss = loss + cfg.hidden_weight * hidden_mse(student_out.hidden_states, teacher_out.hidden_states, layer_map)
    if cfg.hard_weight and gold is not None:
        ce = torch.nn.functional.cross_entropy
        hard = (ce(student_out.start_logits.float(), gold[0]) + ce(student_out.end_logits.float(), gold[1])) / 2
        loss = loss + cfg.hard_weight * hard
    return loss


def sandwich(space, random_subnets: int) -> list:
    """The subnets one supernet step trains (the sandwich rule): the largest, the smallest and
    `random_subnets` random ones of `space`. Drawn from torch's generator, which `fit`
    checkpoints, so a resumed run samples as an uninterrupted one would."""
    rng = random.Random(int(torch.randint(2**31, ())))
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(random_subnets)]


def importance_once(work_dir: Path, compute: Callable[[], dict]) -> dict:
    """The importance scores of a supernet run: computed by `compute` once and kept in `work_dir`,
    so a resumed run sorts its units exactly as the first did."""
    path = work_dir / IMPORTANCE_FILE
    if not path.is_file():
        work_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in compute().items()}, path)
    return load_file(path)


def sorted_teacher(teacher_dir: str | Path, scores: dict) -> torch.nn.Module:
    """The teacher with its units in the supernet's order: the same function, aligned channels
    (so hidden states compare channel by channel). Frozen, in eval mode."""
    teacher = load_qa_model(teacher_dir)
    sort_by_importance(teacher, scores)
    teacher.requires_grad_(False)
    return teacher


def load_supernet(supernet_dir: str | Path) -> tuple[Supernet, dict]:
    """The supernet of a `train_supernet` directory and that directory's manifest."""
    manifest = verify_stage(supernet_dir, "distill", "a supernet (distill)")
    return Supernet(load_qa_model(Path(supernet_dir) / SUPERNET_DIR)), manifest


def train_supernet(cfg: DistillConfig, teacher_dir: str | Path, out_dir: str | Path) -> dict:
    """pretraining-distill: the teacher's weights, sorted by importance, trained as an elastic
    supernet by distillation from the teacher. Each step trains the largest subnet, the
    smallest and `random_subnets` random ones on the same batch (the sandwich rule), so the
    shared weights serve every subnet of the space. Resumable like every `fit`."""
    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    teacher_manifest = verify_manifest(teacher_dir)
    fingerprint = config_hash(cfg) + teacher_manifest["files"]["model.safetensors"][:16]
    existing = reusable(out_dir, fingerprint, "supernet")
    if existing is not None:
        return existing
    torch_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    train_file = resolve_path(cfg.data.train_file)
    tokenizer = load_tokenizer(teacher_dir)
    features = build_features(load_squad(train_file, cfg.data.train_questions), tokenizer, cfg.features)
    model = load_qa_model(teacher_dir)
    space = SearchSpace(cfg.space, TeacherShape.of(model.config))

    work_dir = out_dir / "checkpoints"
    scores = importance_once(work_dir, lambda: importance(model, features, cfg.importance_batches,
                                                          cfg.train.batch_size))
    sort_by_importance(model, scores)
    teacher = sorted_teacher(teacher_dir, scores)
    supernet = Supernet(model)

    def loss_fn(net: Supernet, feats: Features, index: torch.Tensor) -> torch.Tensor:
        inputs = feats.model_inputs(index)
        gold = (feats.start_positions[index], feats.end_positions[index])
        with torch.no_grad():
            target = teacher(**inputs, output_hidden_states=True)
        subnets = sandwich(space, cfg.random_subnets)
        return sum(kd_loss(net(s, output_hidden_states=True, **inputs), target,
                           s.layer_indices(space.teacher.num_layers), cfg.kd, gold) for s in subnets) / len(subnets)

    print(f"distill: {len(features)} training windows; subnets per step: largest, smallest, "
          f"{cfg.random_subnets} random", flush=True)
    stats = fit(supernet, features, loss_fn, cfg.train, cfg.seed, work_dir, fingerprint, desc="supernet")
    model.save_pretrained(out_dir / SUPERNET_DIR)
    tokenizer.save_pretrained(out_dir / SUPERNET_DIR)
    shutil.move(work_dir / IMPORTANCE_FILE, out_dir / IMPORTANCE_FILE)
    shutil.rmtree(work_dir, ignore_errors=True)
    stats.update(train_windows=len(features))
    inputs = {"teacher": {"path": str(teacher_dir.resolve()), "config_hash": teacher_manifest.get("config_hash"),
                          "model_sha256": teacher_manifest["files"]["model.safetensors"]},
              "train_file": {"path": str(train_file), "sha256": sha256_file(train_file)}}
    return write_manifest(out_dir, "distill", to_dict(cfg), stats, inputs, config_hash=fingerprint,
                          teacher_shape=dataclasses.asdict(space.teacher))
