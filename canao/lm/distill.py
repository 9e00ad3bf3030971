"""distill-lm: the elastic decoder (canao.lm.model.DecoderSupernet) trained by knowledge
distillation from the generation teacher on the `canao lm-data` corpus.

The same machinery as the QA supernet (canao.codesign.kd): Taylor importance computed once
and kept across a resume, the resumable `fit` loop with checkpoints and a progress bar, and
the sandwich rule (largest, smallest and random subnets on every batch). The loss is the KL
divergence of the subnet's next-token distributions from the teacher's at a temperature,
optionally plus the hidden-state MSE of each kept layer against the teacher layer it stands
for and the next token's cross-entropy. The residual stream is not elastic and is not
permuted, so the teacher's hidden states align with every subnet's as they are.

The manifest reports, on the held-out text, the teacher's perplexity and the largest and
smallest subnets', and the smallest subnet's soft KL to the teacher before and after.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from canao.codesign.elastic import extract
from canao.codesign.kd import IMPORTANCE_FILE, SUPERNET_DIR, fit, hidden_mse, importance_once, sandwich, soft_kl
from canao.config import KDConfig, config_hash, to_dict
from canao.hardware import torch_threads
from canao.lm import augment
from canao.lm.augment import GENERATED_FILE
from canao.lm.config import LMDistillConfig
from canao.lm.data import HELDOUT_FILE, TRAIN_FILE, perplexity, read_text_file, token_windows
from canao.lm.model import (
    DecoderSupernet,
    block_influence,
    importance,
    load_causal_lm,
    load_tokenizer,
    sort_by_importance,
)
from canao.lm.space import DecoderSpace, DecoderSubnet, decoder_shape, keep_order
from canao.manifest import reusable, sha256_file, verify_manifest, verify_stage, write_manifest, write_text_atomic

STAGE = "distill-lm"
BLOCKS = "blocks"  # the importance file's entry of each teacher block's influence ([layers])


def lm_kd_loss(student_out, teacher_out, layer_map: list[int], cfg: KDConfig, ids: torch.Tensor) -> torch.Tensor:
    """Distillation of a decoder (sub)network from the teacher on token windows `ids` [B, T]:
    `soft_kl` of every position's next-token distribution, `hidden_mse` weighted by
    `cfg.hidden_weight`, and the next token's cross-entropy weighted by `cfg.hard_weight`."""
    loss = soft_kl(student_out.logits, teacher_out.logits, cfg.temperature)
    if cfg.hidden_weight:
        loss = loss + cfg.hidden_weight * hidden_mse(student_out.hidden_states, teacher_out.hidden_states, layer_map)
    if cfg.hard_weight:
        logits = student_out.logits[:, :-1].float()  # [B, T-1, V]: predictions of tokens 1 .. T-1
        hard = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss = loss + cfg.hard_weight * hard
    return loss


@torch.no_grad()
def heldout_kl(supernet: DecoderSupernet, teacher, subnet: DecoderSubnet, windows: torch.Tensor, temperature: float,
               batch_size: int) -> float:
    """The subnet's soft KL to the teacher (as in training, no other terms), averaged over `windows`."""
    total = 0.0
    for begin in range(0, len(windows), batch_size):
        ids = windows[begin : begin + batch_size]
        kl = soft_kl(supernet(subnet, input_ids=ids).logits, teacher(input_ids=ids).logits, temperature)
        total += float(kl) * len(ids)
    return total / len(windows)


def torch_device(name: str) -> torch.device:
    """The torch device of a config's `torch_device` field, refused clearly where torch has none."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("torch_device: cuda, but torch sees no GPU here (torch.cuda.is_available() is False); "
                         "set torch_device: cpu")
    return torch.device(name)


def trainable(model):
    """`model` with its token embedding (tied to the output layer) frozen: the teacher's, kept.
    The corpus holds a small share of the 49,152 tokens, and AdamW's decoupled weight decay
    would shrink every row it never sees; the residual stream is not elastic, so the
    teacher's embedding is already in every subnet's space."""
    model.get_input_embeddings().requires_grad_(False)
    return model


def train_decoder_supernet(cfg: LMDistillConfig, teacher_dir: str | Path, data_dir: str | Path,
                           out_dir: str | Path) -> dict:
    """The teacher decoder's weights, sorted by importance, trained as an elastic supernet by
    distillation on `data_dir`'s train.txt (a `canao lm-data` output). Resumable like every
    `fit`; a directory that already holds this run's result is reused, another run's refused."""
    out_dir, teacher_dir, data_dir = Path(out_dir), Path(teacher_dir), Path(data_dir)
    teacher_manifest = verify_manifest(teacher_dir)
    data_manifest = verify_stage(data_dir, "lm-data", "an LM corpus (lm-data)")
    fingerprint = (config_hash(cfg) + teacher_manifest["files"]["model.safetensors"][:16]
                   + data_manifest["files"][TRAIN_FILE][:16])
    existing = reusable(out_dir, fingerprint, "decoder supernet")
    if existing is not None:
        return existing
    device = torch_device(cfg.torch_device)
    torch_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(teacher_dir)
    work_dir = out_dir / "checkpoints"
    windows = token_windows(tokenizer, read_text_file(data_dir / TRAIN_FILE), cfg.seq_len, cfg.max_windows)
    generated = _generated_once(cfg, teacher_dir, data_dir, work_dir, fingerprint)
    if generated is not None:
        windows = torch.cat([windows, token_windows(tokenizer, read_text_file(work_dir / GENERATED_FILE),
                                                    cfg.seq_len)])
    windows = windows.to(device)
    heldout_text = read_text_file(data_dir / HELDOUT_FILE)
    probe_windows = -(-cfg.eval_tokens // cfg.seq_len) if cfg.eval_tokens else 0
    probe = token_windows(tokenizer, heldout_text, cfg.seq_len, probe_windows).to(device)
    model = trainable(load_causal_lm(teacher_dir).to(device))

    def scores_of_units_and_blocks() -> dict:
        influence = block_influence(model, windows, cfg.importance_batches, cfg.train.batch_size)
        return {**importance(model, windows, cfg.importance_batches, cfg.train.batch_size),
                BLOCKS: torch.tensor(influence, dtype=torch.float64)}

    scores = importance_once(work_dir, scores_of_units_and_blocks)
    sort_by_importance(model, scores)
    influence = scores[BLOCKS].tolist()
    space = DecoderSpace(cfg.space, decoder_shape(model.config), keep_order(influence))
    smallest = space.smallest()
    teacher = load_causal_lm(teacher_dir).to(device).requires_grad_(False)
    supernet = DecoderSupernet(model)
    batch = cfg.train.eval_batch_size
    supernet.eval()  # `fit` switches it to training mode
    kl_before = heldout_kl(supernet, teacher, smallest, probe, cfg.kd.temperature, batch)
    hidden = cfg.kd.hidden_weight > 0

    def loss_fn(net: DecoderSupernet, examples: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ids = examples[index]  # [B, T]
        with torch.no_grad():
            target = teacher(input_ids=ids, output_hidden_states=hidden)
        subnets = sandwich(space, cfg.random_subnets)
        return sum(lm_kd_loss(net(s, input_ids=ids, output_hidden_states=hidden), target,
                              s.layer_indices(space.teacher.num_layers), cfg.kd, ids) for s in subnets) / len(subnets)

    print(f"distill-lm: {len(windows)} windows of {cfg.seq_len} tokens; subnets per step: largest, smallest, "
          f"{cfg.random_subnets} random", flush=True)
    stats = fit(supernet, windows, loss_fn, cfg.train, cfg.seed, work_dir, fingerprint, desc="decoder supernet")
    if generated is not None:
        stats["generated"] = generated
    # Reported, and read back by the search: which blocks each depth keeps.
    stats.update(block_influence=[round(v, 5) for v in influence], block_order=space.block_order)
    stats.update(train_windows=len(windows), heldout_kl_smallest={
        "before": round(kl_before, 4),
        "after": round(heldout_kl(supernet, teacher, smallest, probe, cfg.kd.temperature, batch), 4)})
    stats["heldout_perplexity"] = {
        name: round(perplexity(net, tokenizer, heldout_text, cfg.eval_tokens, progress=False)["perplexity"], 3)
        for name, net in (("teacher", teacher), ("largest", extract(supernet, space.largest()).to(device)),
                          ("smallest", extract(supernet, smallest).to(device)))}
    model.save_pretrained(out_dir / SUPERNET_DIR)
    tokenizer.save_pretrained(out_dir / SUPERNET_DIR)
    shutil.move(work_dir / IMPORTANCE_FILE, out_dir / IMPORTANCE_FILE)
    if generated is not None:
        shutil.move(work_dir / GENERATED_FILE, out_dir / GENERATED_FILE)
    shutil.rmtree(work_dir, ignore_errors=True)
    inputs = {"teacher": {"path": str(teacher_dir.resolve()), "config_hash": teacher_manifest.get("config_hash"),
                          "model_sha256": teacher_manifest["files"]["model.safetensors"]},
              "data": {"path": str(data_dir.resolve()), "train_sha256": data_manifest["files"][TRAIN_FILE],
                       "heldout_sha256": data_manifest["files"][HELDOUT_FILE]}}
    return write_manifest(out_dir, STAGE, to_dict(cfg), stats, inputs, config_hash=fingerprint,
                          teacher_shape=dataclasses.asdict(space.teacher))


def _generated_once(cfg: LMDistillConfig, teacher_dir: Path, data_dir: Path, work_dir: Path,
                    fingerprint: str) -> dict | None:
    """The teacher's own text (canao.lm.augment) for this run, written into `work_dir` once (a
    resumed run trains on the same text) and its provenance; None where `augment.prompts` is 0."""
    if not cfg.augment.prompts:
        return None
    kept = work_dir / (GENERATED_FILE + ".json")
    if kept.is_file() and (work_dir / GENERATED_FILE).is_file():
        provenance = json.loads(kept.read_text())
        if provenance["fingerprint"] == fingerprint:
            return provenance["generated"]
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"distill-lm: the teacher continues {cfg.augment.prompts} openings of {TRAIN_FILE} in llama.cpp",
          flush=True)
    generated = augment.generate(cfg.augment, augment.teacher_file(teacher_dir, work_dir),
                                 read_text_file(data_dir / TRAIN_FILE), work_dir / GENERATED_FILE)
    write_text_atomic(kept, json.dumps({"fingerprint": fingerprint, "generated": generated}))
    return generated


def load_decoder_supernet(supernet_dir: str | Path) -> tuple[DecoderSupernet, dict]:
    """The supernet of a `train_decoder_supernet` directory and that directory's manifest."""
    manifest = verify_stage(supernet_dir, STAGE, f"a decoder supernet ({STAGE})")
    return DecoderSupernet(load_causal_lm(Path(supernet_dir) / SUPERNET_DIR)), manifest


def supernet_order(supernet_manifest: dict) -> list[int] | None:
    """`keep_order` of the teacher's blocks the supernet was distilled with; None for a supernet
    that kept evenly spaced blocks (a "spread" space, or one distilled before block influence)."""
    return supernet_manifest["metrics"].get("block_order")


def corpus_file(supernet_manifest: dict, name: str) -> Path:
    """The corpus file `name` (TRAIN_FILE, HELDOUT_FILE) the supernet was distilled with, checked
    against the hash its manifest recorded."""
    data = supernet_manifest["inputs"]["data"]
    path = Path(data["path"]) / name
    recorded = data["train_sha256" if name == TRAIN_FILE else "heldout_sha256"]
    if not path.is_file() or sha256_file(path) != recorded:
        raise ValueError(f"{path}: not the {name} the supernet was distilled with (missing or sha256 differs)")
    return path


def distilled_teacher(supernet_manifest: dict) -> Path:
    """The teacher directory the supernet was distilled from, checked against its recorded weights."""
    teacher = supernet_manifest["inputs"]["teacher"]
    path = Path(teacher["path"])
    if verify_manifest(path)["files"]["model.safetensors"] != teacher["model_sha256"]:
        raise ValueError(f"{path}: not the teacher the supernet was distilled from (its weights changed)")
    return path
