"""Knowledge distillation as every family trains: the resumable loop and its batches, the soft,
hidden-state and attention-relation losses, the teacher's outputs kept on disk, the sandwich rule and importance scores
kept across a resume.

The loop checkpoints model, optimizer, schedule, step and RNG state every
`checkpoint_every` steps; a run killed half-way restarts from its last checkpoint and
sees the same batches in the same order as an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sized
from pathlib import Path

import numpy as np
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


# loss_fn(model, examples, batch_index) -> the scalar loss of that batch, or its weighted terms by name
# (summed into the loss; each shown on the progress bar and reported, so their balance is visible)
LossFn = Callable[[torch.nn.Module, Sized, torch.Tensor], torch.Tensor | dict[str, torch.Tensor]]


def epoch_batches(size: int, batch_size: int, seed: int, lengths: torch.Tensor | None = None,
                  pool: int = 0) -> list[torch.Tensor]:
    """One epoch's batches of indices into `size` examples, each example once: consecutive slices
    of a random permutation, or with `lengths` and `pool` > 0, slices of pools of `pool` batches
    sorted by length (a batch's windows are alike in length, so it pads little), in random order."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(size, generator=generator)
    if lengths is None or not pool:
        return list(order.split(batch_size))
    batches = []
    for chunk in order.split(pool * batch_size):
        batches += chunk[torch.argsort(lengths[chunk], stable=True)].split(batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def fit(model: torch.nn.Module, features: Sized, loss_fn: LossFn, cfg: TrainConfig, seed: int,
        work_dir: Path, fingerprint: str, desc: str = "train", lengths: torch.Tensor | None = None) -> dict:
    """Train `model` on `features` (QA windows, LM token windows: anything with a length whose
    batches `loss_fn` picks by index), resuming from `work_dir`'s checkpoint if one exists.
    `lengths` (real tokens per example) lets `cfg.length_pool` batch examples of like length."""
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
    step, seconds, loss_ema = 0, 0.0, {}
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
    started, run_started, run_windows = time.perf_counter() - seconds, time.perf_counter(), 0
    batches = None
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if in_epoch == 0 or batches is None:
            batches = epoch_batches(len(features), cfg.batch_size, seed + epoch, lengths, cfg.length_pool)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            terms = loss_fn(model, features, batches[in_epoch])
        terms = terms if isinstance(terms, dict) else {"loss": terms}
        run_windows += len(batches[in_epoch])
        loss = sum(terms.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        for name, value in {"loss": loss, **terms}.items():  # the total first; a lone term is the total
            loss_ema[name] = value.item() if name not in loss_ema else 0.98 * loss_ema[name] + 0.02 * value.item()
        bar.update(1)
        bar.set_postfix({name: f"{value:.3f}" for name, value in loss_ema.items()} | {"epoch": epoch})
        if step % cfg.checkpoint_every == 0 and step < total_steps:
            _save_checkpoint(checkpoint, {
                "fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "rng": torch.get_rng_state(), "step": step,
                "seconds": time.perf_counter() - started, "loss_ema": loss_ema,
            })
    bar.close()
    model.eval()
    # this run's steps only: a resumed run's earlier steps may have run at another speed
    windows_per_s = run_windows / (time.perf_counter() - run_started) if run_windows else None
    return {"steps": total_steps, "train_seconds": round(time.perf_counter() - started, 1),
            "windows_per_s": windows_per_s and round(windows_per_s, 2),
            "final_loss": round(loss_ema["loss"], 4),
            "final_loss_terms": {name: round(v, 4) for name, v in loss_ema.items() if name != "loss"},
            "precision": {"bf16": cfg.bf16, "autocast": precision, "why": why}, "threads": torch.get_num_threads()}


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


def hidden_mse(student_hidden: tuple, teacher_hidden, layer_map: list[int],
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the student's embeddings and layers of the MSE against the teacher's embeddings and
    the teacher layer each stands for (`layer_map[j]`; `teacher_hidden[i]`: the output of teacher
    layer i, 0 the embeddings), on the student's width (its channels are the teacher's first ones),
    over the tokens where `mask` [B, T] is 1 (padding carries nothing to learn), or every token."""
    width = student_hidden[0].shape[-1]
    weights = None if mask is None else mask[..., None].float()
    total = 0
    for s, i in zip(student_hidden, [0] + [i + 1 for i in layer_map], strict=True):
        error = (s.float() - teacher_hidden[i][..., :width].float()) ** 2
        total = total + (error.mean() if weights is None else (error * weights).sum() / (weights.sum() * width))
    return total / (len(layer_map) + 1)


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """MiniLMv2's self-attention relation KD for one kind of vector (queries, keys or values):
    student [B, T, Ds] and teacher [B, T, Dt], each split into `heads` relation heads of Ds/heads
    and Dt/heads channels, so widths and head counts need not match. A token's relation is the
    softmax over the real tokens (`mask` [B, T] is 1 there) of its scaled dot products with every
    token; the KL of the student's relations from the teacher's, averaged over the real tokens
    and the heads."""
    for name, x in (("student", student), ("teacher", teacher)):
        if x.shape[-1] % heads:
            raise ValueError(f"kd.relation_heads: {heads} does not divide the {name}'s attention width "
                             f"{x.shape[-1]}")
    keys = mask[:, None, None, :] == 0  # [B, 1, 1, T]

    def log_relations(x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, heads, T, T]
        b, t, d = x.shape
        x = x.float().reshape(b, t, heads, d // heads).transpose(1, 2)
        return torch.log_softmax((x @ x.transpose(-1, -2) / math.sqrt(d // heads)).masked_fill(keys, -1e4), dim=-1)

    s, t = log_relations(student), log_relations(teacher)
    kl = (t.exp() * (t - s)).sum(-1)  # [B, heads, T]
    weights = mask[:, None, :].float()
    return (kl * weights).sum() / (weights.sum() * heads)


def sandwich(space, random_subnets: int) -> list:
    """The subnets one supernet step trains (the sandwich rule): the largest, the smallest and
    `random_subnets` random ones of `space`. Drawn from torch's generator, which `fit`
    checkpoints, so a resumed run samples as an uninterrupted one would."""
    rng = random.Random(int(torch.randint(2**31, ())))
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(random_subnets)]


class TeacherTargets:
    """The teacher's outputs on a fixed set of examples, computed once and kept on disk: a KD step
    reads them instead of running the teacher again (its outputs on a fixed input never change,
    and its forward pass costs more than the student's forward and backward together).

    Every output is per token ([examples, tokens, ...] from `outputs`) and is kept for the real
    tokens of each example only (the first `lengths[i]`), packed end to end in float16 and
    memory-mapped, so a large set costs disk and page cache, not process memory.
    """

    INDEX = "targets.json"

    def __init__(self, directory: Path):
        meta = json.loads((directory / self.INDEX).read_text())
        self.fingerprint = meta["fingerprint"]
        self.lengths = torch.tensor(meta["lengths"])
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in meta["names"]}

    @classmethod
    def compute(cls, directory: Path, fingerprint: str, lengths: torch.Tensor,
                outputs: Callable[[torch.Tensor], dict[str, torch.Tensor]], batch_size: int,
                bf16: bool | str = False, device_type: str = "cpu", desc: str = "teacher targets") -> TeacherTargets:
        """The targets in `directory`: those already there if made for `fingerprint`, else
        `outputs(index)` over every example, `batch_size` examples of like length at a time (little
        padding), under bfloat16 autocast where `bf16` (a TrainConfig.bf16) asks for it, written anew."""
        if (directory / cls.INDEX).is_file():
            kept = cls(directory)
            if kept.fingerprint == fingerprint:
                return kept
        scratch = directory.with_name(directory.name + ".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        starts, total = torch.cumsum(lengths, 0) - lengths, int(lengths.sum())
        arrays: dict[str, np.ndarray] = {}
        autocast, _ = autocast_bf16(bf16, device_type)
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            for index in tqdm(torch.argsort(lengths, stable=True).split(batch_size), desc=desc, unit="batch"):
                for name, value in outputs(index).items():
                    if name not in arrays:
                        arrays[name] = np.lib.format.open_memmap(scratch / f"{name}.npy", mode="w+",
                                                                 dtype=np.float16, shape=(total, *value.shape[2:]))
                    value = value.float().cpu().numpy()
                    for row, i in enumerate(index.tolist()):
                        arrays[name][int(starts[i]):int(starts[i]) + int(lengths[i])] = value[row, :int(lengths[i])]
        for array in arrays.values():
            array.flush()
        meta = {"fingerprint": fingerprint, "names": sorted(arrays), "lengths": lengths.tolist()}
        (scratch / cls.INDEX).write_text(json.dumps(meta))
        shutil.rmtree(directory, ignore_errors=True)
        scratch.rename(directory)
        return cls(directory)

    def batch(self, index: torch.Tensor, tokens: int) -> dict[str, torch.Tensor]:
        """The outputs of examples `index`, float32 [len(index), tokens, ...], zero past each
        example's real tokens."""
        out = {}
        for name, array in self.arrays.items():
            value = torch.zeros(len(index), tokens, *array.shape[1:])
            for row, i in enumerate(index.tolist()):
                start, length = int(self.starts[i]), min(int(self.lengths[i]), tokens)
                value[row, :length] = torch.from_numpy(np.asarray(array[start:start + length], dtype=np.float32))
            out[name] = value
        return out


def importance_once(work_dir: Path, compute: Callable[[], dict]) -> dict:
    """The importance scores of a supernet run: computed by `compute` once and kept in `work_dir`,
    so a resumed run sorts its units exactly as the first did."""
    path = work_dir / IMPORTANCE_FILE
    if not path.is_file():
        work_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in compute().items()}, path)
    return load_file(path)
