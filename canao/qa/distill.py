"""distill (the pipeline's pretraining-distill stage): the teacher's weights, sorted by
importance, trained as an elastic supernet by distillation from the teacher with the
family-agnostic loop of canao.codesign.kd; the QA loss (`kd_loss`): soft start/end
distributions, hidden states, optionally the gold span and the last layer's attention relations.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from canao.codesign.kd import (
    IMPORTANCE_FILE,
    SUPERNET_DIR,
    TeacherTargets,
    fit,
    hidden_mse,
    importance_once,
    relation_kl,
    sandwich,
    soft_kl,
)
from canao.config import KDConfig, config_hash, resolve_path, to_dict
from canao.hardware import torch_threads
from canao.manifest import reusable, sha256_file, verify_manifest, verify_stage, write_manifest
from canao.qa.augment import with_copies
from canao.qa.config import BertShape, DistillConfig, QAKDConfig
from canao.qa.data import Features, build_features, load_squad
from canao.qa.model import (
    Supernet,
    importance,
    last_layer_qkv,
    load_qa_model,
    load_tokenizer,
    sort_by_importance,
)
from canao.qa.space import SearchSpace

# Logit of padding positions in the span distributions: no answer starts or ends there, and the
# teacher's outputs there are not kept (TeacherTargets), so neither side puts mass on them.
PAD_LOGIT = -1e4


def matched_layers(layer_map: list[int]) -> list[int]:
    """The teacher hidden states a student of `layer_map` learns from: 0 (the embeddings) and
    the output of each teacher layer it keeps."""
    return [0] + [i + 1 for i in layer_map]


def target_layers(layer_maps: list[list[int]], kd: QAKDConfig, teacher_layers: int) -> list[int]:
    """The teacher hidden states that students of `layer_maps` learn from under `kd`: each one's
    `matched_layers` where hidden-state KD is on, and the input of the teacher's last layer
    (`teacher_layers - 1`) where attention-relation KD is, from which its queries, keys and values follow."""
    layers = {i for layer_map in layer_maps for i in matched_layers(layer_map)} if kd.hidden_weight else set()
    if kd.attention_weight:
        layers.add(teacher_layers - 1)
    return sorted(layers)


def teacher_targets(teacher: torch.nn.Module, inputs: dict, hidden: list[int]) -> dict[str, torch.Tensor]:
    """What a student learns from the teacher on `inputs`: start and end logits [B, T], and the
    hidden states [B, T, H] `hidden.<i>` of each teacher layer in `hidden` (0: the embeddings)."""
    out = teacher(**inputs, output_hidden_states=bool(hidden))
    return {"start_logits": out.start_logits, "end_logits": out.end_logits,
            **{f"hidden.{i}": out.hidden_states[i] for i in hidden}}


def kd_loss(student_out, target: dict[str, torch.Tensor], layer_map: list[int], cfg: KDConfig,
            mask: torch.Tensor, gold: tuple | None = None, relations: tuple | None = None) -> dict[str, torch.Tensor]:
    """Knowledge distillation of a QA (sub)network from the teacher's `target` (teacher_targets),
    as weighted terms: `kl`, the soft start and end distributions over the real tokens (`mask`
    [B, T] is 1 there), averaged; `hidden`, `hidden_mse` on the real tokens weighted by
    `cfg.hidden_weight`; `hard`, optionally the gold span's cross-entropy (`gold`: start and end
    positions) weighted by `cfg.hard_weight`."""
    def spans(logits):
        return logits.float().masked_fill(mask == 0, PAD_LOGIT)

    start, end = spans(student_out.start_logits), spans(student_out.end_logits)
    terms = {"kl": (soft_kl(start, spans(target["start_logits"]), cfg.temperature)
                    + soft_kl(end, spans(target["end_logits"]), cfg.temperature)) / 2}
    if cfg.hidden_weight:
        teacher_hidden = {i: target[f"hidden.{i}"] for i in matched_layers(layer_map)}
        terms["hidden"] = cfg.hidden_weight * hidden_mse(student_out.hidden_states, teacher_hidden, layer_map, mask)
    if cfg.hard_weight and gold is not None:
        ce = torch.nn.functional.cross_entropy
        terms["hard"] = cfg.hard_weight * (ce(start, gold[0]) + ce(end, gold[1])) / 2
    if relations is not None:
        pairs = zip(*relations, strict=True)
        terms["attention"] = cfg.attention_weight * sum(relation_kl(s, t, cfg.relation_heads, mask)
                                                        for s, t in pairs) / 3
    return terms


def kept_targets_of(targets: TeacherTargets):
    """A `student_kd_loss` `targets_of` that reads the teacher's kept `targets`, trimmed to the batch's length."""
    return lambda index, inputs: targets.batch(index, inputs["input_ids"].shape[1])


def student_kd_loss(targets_of, layer_map: list[int], cfg: QAKDConfig, teacher: torch.nn.Module):
    """The `fit` loss of a standalone student distilled from the teacher's targets on its windows:
    `targets_of(index, inputs)` gives `teacher_targets` of the windows `index` (kept or fresh), with
    the `target_layers` of this student. `teacher` (frozen) projects its kept last-layer input to
    queries, keys and values where `cfg.attention_weight` asks for relation KD."""
    last_input = f"hidden.{teacher.config.num_hidden_layers - 1}"

    def loss_fn(model, feats: Features, index: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = feats.model_inputs(index)
        gold = (feats.start_positions[index], feats.end_positions[index])
        out, target = model(**inputs, output_hidden_states=True), targets_of(index, inputs)
        relations = None
        if cfg.attention_weight:
            with torch.no_grad():
                teacher_qkv = last_layer_qkv(teacher, target[last_input].float())
            relations = (last_layer_qkv(model, out.hidden_states[-2]), teacher_qkv)
        return kd_loss(out, target, layer_map, cfg, inputs["attention_mask"], gold, relations)
    return loss_fn


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
    features = build_features(with_copies(load_squad(train_file, cfg.data.train_questions), cfg.augment),
                              tokenizer, cfg.features)
    model = load_qa_model(teacher_dir)
    space = SearchSpace(cfg.space, BertShape.of(model.config))

    work_dir = out_dir / "checkpoints"
    scores = importance_once(work_dir, lambda: importance(model, features, cfg.importance_batches,
                                                          cfg.train.batch_size))
    sort_by_importance(model, scores)
    teacher = sorted_teacher(teacher_dir, scores)
    supernet = Supernet(model)

    every_layer = list(range(space.teacher.num_layers + 1))

    def loss_fn(net: Supernet, feats: Features, index: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = feats.model_inputs(index)
        gold = (feats.start_positions[index], feats.end_positions[index])
        with torch.no_grad():
            target = teacher_targets(teacher, inputs, every_layer if cfg.kd.hidden_weight else [])
        subnets = sandwich(space, cfg.random_subnets)
        per_subnet = [kd_loss(net(s, output_hidden_states=True, **inputs), target,
                              s.layer_indices(space.teacher.num_layers), cfg.kd, inputs["attention_mask"], gold)
                      for s in subnets]
        return {name: sum(terms[name] for terms in per_subnet) / len(subnets) for name in per_subnet[0]}

    print(f"distill: {len(features)} training windows; subnets per step: largest, smallest, "
          f"{cfg.random_subnets} random", flush=True)
    stats = fit(supernet, features, loss_fn, cfg.train, cfg.seed, work_dir, fingerprint, desc="supernet",
                lengths=features.lengths())
    model.save_pretrained(out_dir / SUPERNET_DIR)
    tokenizer.save_pretrained(out_dir / SUPERNET_DIR)
    shutil.move(work_dir / IMPORTANCE_FILE, out_dir / IMPORTANCE_FILE)
    shutil.rmtree(work_dir, ignore_errors=True)
    stats.update(train_windows=len(features))
    inputs = {"teacher": {"path": str(teacher_dir.resolve()), "config_hash": teacher_manifest.get("config_hash"),
                          "model_sha256": teacher_manifest["files"]["model.safetensors"],
                          # the first N training questions it was fine-tuned on (0 = all): the search's
                          # held-out slice must lie past them, or the teacher's targets there are memorised
                          "train_questions": teacher_manifest["config"]["data"]["train_questions"]},
              "train_file": {"path": str(train_file), "sha256": sha256_file(train_file)}}
    return write_manifest(out_dir, "distill", to_dict(cfg), stats, inputs, config_hash=fingerprint,
                          teacher_shape=dataclasses.asdict(space.teacher))
