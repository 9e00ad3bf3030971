"""Knowledge distillation as every family trains: the resumable loop, the soft and hidden-state
losses, the sandwich rule and importance scores kept across a resume.

The loop checkpoints model, optimizer, schedule, step and RNG state every
`checkpoint_every` steps; a run killed half-way restarts from its last checkpoint and
sees the same batches in the same order as an uninterrupted run would.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sized
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from canao.config import TrainConfig
from canao.hardware import autocast_bf16
from canao.manifest import write_atomic

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
