"""Sequence-level KD text (Kim and Rush 2016): the teacher's own continuations of openings of
the training text, sampled in llama.cpp, which distill-lm trains on beside the corpus (the
LM counterpart of canao.qa.augment's teacher-labelled copies). The openings come from
train.txt only, so the held-out articles never enter; the text is written once, and its
provenance (the teacher's file, the sampling, the seed) goes into the supernet's manifest.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from canao.lm.config import LMAugmentConfig
from canao.lm.gguf import export_gguf, exported_gguf, open_llama_cpp
from canao.manifest import sha256_file, write_atomic

GENERATED_FILE = "generated.txt"  # the teacher's continuations, one passage each, blank-line separated
MIN_WORDS = 40  # a line of train.txt shorter than this (a heading, a list item) opens no passage


def openings(text: str, count: int, seed: int) -> list[str]:
    """`count` distinct paragraphs of `text` (lines of at least MIN_WORDS words), chosen by `seed`."""
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if len(line.split()) >= MIN_WORDS))
    if not lines:
        raise ValueError(f"augment.prompts: the training text has no line of {MIN_WORDS} words or more to open "
                         "a passage")
    return random.Random(seed).sample(lines, min(count, len(lines)))


def teacher_file(teacher_dir: Path, work_dir: Path) -> Path:
    """The GGUF file llama.cpp runs the teacher from: its directory's export, else one written
    into `work_dir` as the teacher's GGUF stores each tensor."""
    return exported_gguf(teacher_dir) or export_gguf(teacher_dir, work_dir / "teacher.gguf")


def generate(cfg: LMAugmentConfig, gguf: Path, text: str, out_file: Path) -> dict:
    """Write the teacher's continuations of `cfg.prompts` openings of `text` to `out_file`;
    return their provenance. Each passage is its opening's first `cfg.prompt_tokens` tokens and
    up to `cfg.new_tokens` sampled after them (the teacher may end it sooner)."""
    threads = cfg.threads or os.cpu_count() or 1
    llm = open_llama_cpp(gguf, cfg.prompt_tokens + cfg.new_tokens, threads)
    passages, new_tokens = [], 0
    for i, opening in enumerate(openings(text, cfg.prompts, cfg.seed)):
        prompt = llm.tokenize(opening.encode("utf-8"), add_bos=False)[: cfg.prompt_tokens]
        out = llm.create_completion(prompt, max_tokens=cfg.new_tokens, temperature=cfg.temperature,
                                    top_p=cfg.top_p, seed=cfg.seed + i)
        passages.append((llm.detokenize(prompt).decode("utf-8", errors="ignore") + out["choices"][0]["text"]).strip())
        new_tokens += out["usage"]["completion_tokens"]
    write_atomic(out_file, lambda tmp: tmp.write_text("\n\n".join(passages) + "\n", encoding="utf-8"))
    return {"file": out_file.name, "sha256": sha256_file(out_file), "teacher_gguf": str(gguf),
            "teacher_gguf_sha256": sha256_file(gguf), "passages": len(passages), "new_tokens": new_tokens,
            "threads": threads}
