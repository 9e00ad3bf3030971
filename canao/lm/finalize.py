"""finalize-lm: the generation search's chosen point (the lowest perplexity within its latency
budget) extracted into a standalone decoder and fine-tuned by the same distillation as
distill-lm; its held-out perplexity and its agreement with the teacher in the manifest (greedy:
of the tokens each writes after held-out prompts; top-1: on the held-out text itself),
beside the latencies the search gave it (ms per token and time to first token, predicted, and
measured where the search timed it again), and its GGUF export for llama.cpp beside it, with
llama.cpp's own perplexity of that file (what serving's `lm_perplexity_tol` reads before it
serves the file).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from canao.codesign.elastic import extract
from canao.codesign.kd import SUPERNET_DIR, fit
from canao.codesign.pareto import FRONT_JSON, choose
from canao.config import config_hash, to_dict
from canao.hardware import torch_threads
from canao.lm.config import LMFinalizeConfig
from canao.lm.data import (
    HELDOUT_FILE,
    TRAIN_FILE,
    greedy_agreement,
    greedy_tokens,
    perplexity,
    prompt_windows,
    read_text_file,
    token_windows,
)
from canao.lm.distill import corpus_file, distilled_teacher, lm_kd_loss, load_decoder_supernet, torch_device, trainable
from canao.lm.gguf import GGUF_FILE, export_gguf, gguf_model
from canao.lm.model import load_causal_lm, load_tokenizer
from canao.lm.search import LATENCY_NAMES, OBJECTIVES
from canao.lm.space import DecoderSubnet
from canao.manifest import reusable, sha256_file, verify_stage, write_manifest


def finalize_student(cfg: LMFinalizeConfig, supernet_dir: str | Path, search_dir: str | Path,
                     out_dir: str | Path) -> dict:
    """`canao finalize-lm`: the student decoder directory (save_pretrained layout + manifest) of the
    search's chosen point, fine-tuned by distillation from the teacher on the supernet's corpus.
    Resumable like every `fit`; a directory holding this run's result is reused, another's refused."""
    supernet_dir, search_dir, out_dir = Path(supernet_dir), Path(search_dir), Path(out_dir)
    search_manifest = verify_stage(search_dir, "search-lm", "a generation search (search-lm)")
    result = json.loads((search_dir / FRONT_JSON).read_text())
    point = choose(result, OBJECTIVES[result["objective"]])
    subnet = DecoderSubnet.from_dict(point["subnet"])
    fingerprint = config_hash(cfg) + "-" + search_manifest["files"][FRONT_JSON][:16]
    existing = reusable(out_dir, fingerprint, "student")
    if existing is not None:
        return existing
    device = torch_device(cfg.torch_device)
    threads = torch_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    supernet, supernet_manifest = load_decoder_supernet(supernet_dir)
    tokenizer = load_tokenizer(supernet_dir / SUPERNET_DIR)
    train_file, heldout_file = (corpus_file(supernet_manifest, name) for name in (TRAIN_FILE, HELDOUT_FILE))
    windows = token_windows(tokenizer, read_text_file(train_file), cfg.seq_len, cfg.max_windows).to(device)
    teacher = load_causal_lm(distilled_teacher(supernet_manifest)).to(device).requires_grad_(False)
    student = trainable(extract(supernet, subnet).to(device))
    layer_map = subnet.layer_indices(supernet.shape.num_layers)
    hidden = cfg.kd.hidden_weight > 0

    def loss_fn(model, examples: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ids = examples[index]  # [B, T]
        with torch.no_grad():
            target = teacher(input_ids=ids, output_hidden_states=hidden)
        return lm_kd_loss(model(input_ids=ids, output_hidden_states=hidden), target, layer_map, cfg.kd, ids)

    print(f"finalize-lm: {subnet.label()} (search perplexity {point['perplexity']:.2f}); fine-tuning on "
          f"{len(windows)} windows of {cfg.seq_len} tokens", flush=True)
    work_dir = out_dir / "checkpoints"
    stats = fit(student, windows, loss_fn, cfg.train, cfg.seed, work_dir, fingerprint, desc="student")
    shutil.rmtree(work_dir, ignore_errors=True)
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    export_gguf(out_dir, out_dir / GGUF_FILE)  # what llama.cpp runs: the fastest CPU runtime for a decoder
    heldout = read_text_file(heldout_file)
    scored, reference = (perplexity(net, tokenizer, heldout, cfg.eval_tokens, progress=False, top1=True)
                         for net in (student, teacher))
    exported = perplexity(gguf_model(out_dir, threads), tokenizer, heldout, cfg.eval_tokens,
                          progress=False)
    prompts = prompt_windows(tokenizer, heldout, cfg.agreement_prompts, cfg.agreement_prompt_tokens)
    written = greedy_agreement(student.eval(), greedy_tokens(teacher, prompts, cfg.agreement_tokens), prompts)
    stats.update(
        subnet=subnet.to_dict(), train_windows=len(windows), perplexity=round(scored["perplexity"], 3),
        teacher_perplexity=round(reference["perplexity"], 3), heldout_tokens=scored["tokens"],
        perplexity_vs_teacher=round(scored["perplexity"] / reference["perplexity"], 4),
        gguf_perplexity=round(exported["perplexity"], 3),
        greedy_agreement=round(written, 4), agreement_prompts=len(prompts),
        top1_agreement=round(float((scored["top1"] == reference["top1"]).double().mean()), 4),
        parameters=sum(p.numel() for p in student.parameters()), search_perplexity=point["perplexity"],
        search_objective=result["objective"],
        **{f"{kind}_{name}": point[f"{kind}_{name}"] for name in LATENCY_NAMES.values()
           for kind in ("predicted", "measured")})
    inputs = {"supernet": str(supernet_dir.resolve()), "search": str(search_dir.resolve()),
              "train_file": {"path": str(train_file), "sha256": sha256_file(train_file)},
              "heldout_file": {"path": str(heldout_file), "sha256": sha256_file(heldout_file)}}
    return write_manifest(out_dir, "finalize-lm", {**to_dict(cfg), "subnet": subnet.to_dict()}, stats, inputs,
                          config_hash=fingerprint)
