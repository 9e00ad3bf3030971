"""Text for the decoder LM: the distillation corpus, its held-out slice, training windows, and perplexity.

The corpus is the SQuAD training-subset paragraphs (each once) and the WikiText-2 articles
of `../shared/data/text/` except its last `heldout_articles` articles, which are held out:
perplexity is measured on them and nothing trains on them. SQuAD dev-a is not used here
(it is the QA evaluation set).

Perplexity has one protocol, so teacher and student compare: the whole file tokenized once
(no special tokens), then windows of `PPL_WINDOW` tokens advancing by `PPL_STRIDE`; each
window scores only the tokens no earlier window scored, so every token but the first is
scored exactly once, with at least PPL_WINDOW - PPL_STRIDE tokens of context after the first
window.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from tqdm import tqdm

from canao.config import config_hash, resolve_path, to_dict
from canao.lm.config import LMDataConfig
from canao.manifest import write_manifest

PPL_WINDOW = 512  # tokens per forward pass
PPL_STRIDE = 256  # tokens newly scored per window after the first
TRAIN_FILE, HELDOUT_FILE = "train.txt", "heldout.txt"
# A WikiText article starts with its title line, " = Title = "; sections are " = = Section = = ".
ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_articles(path: str | Path) -> list[str]:
    """The articles of a WikiText raw file, each with its title line, in file order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: WikiText file not found") from None
    articles: list[list[str]] = []
    for line in lines:
        if ARTICLE_TITLE.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["\n".join(a) for a in articles if any(s.strip() for s in a)]


def squad_paragraphs(path: str | Path) -> list[str]:
    """Every distinct paragraph of a SQuAD v1.1 file, in file order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: SQuAD file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a SQuAD v1.1 file ({e})") from None
    return list(dict.fromkeys(p["context"] for article in data for p in article["paragraphs"]))


def build_corpus(cfg: LMDataConfig, out_dir: str | Path) -> dict:
    """Write train.txt (SQuAD paragraphs, then the WikiText articles not held out) and
    heldout.txt (the last `heldout_articles` WikiText articles) to `out_dir`, with a manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; choose another --out")
    articles = wikitext_articles(resolve_path(cfg.wikitext_file))
    if not 0 < cfg.heldout_articles < len(articles):
        raise ValueError(f"heldout_articles: must be in [1, {len(articles) - 1}] for {cfg.wikitext_file} "
                         f"({len(articles)} articles), got {cfg.heldout_articles}")
    train = "\n\n".join(squad_paragraphs(resolve_path(cfg.squad_file)) + articles[: -cfg.heldout_articles])
    if cfg.max_train_chars:
        train = train[: cfg.max_train_chars]
    heldout = "\n\n".join(articles[-cfg.heldout_articles :])
    out_dir.mkdir(parents=True)
    (out_dir / TRAIN_FILE).write_text(train + "\n", encoding="utf-8")
    (out_dir / HELDOUT_FILE).write_text(heldout + "\n", encoding="utf-8")
    return write_manifest(
        out_dir, "lm-data", config=to_dict(cfg), config_hash=config_hash(cfg),
        metrics={"train_chars": len(train), "heldout_chars": len(heldout), "heldout_articles": cfg.heldout_articles,
                 "wikitext_articles": len(articles)},
    )


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: text file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty; nothing to score")
    return text


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int = 0) -> torch.Tensor:
    """`text` tokenized once (no special tokens) and cut into consecutive windows of `seq_len`
    tokens, [N, seq_len] int64; the ragged tail is dropped. `max_windows` > 0 keeps the first N."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    count = len(ids) // seq_len
    if max_windows:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"seq_len: the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: count * seq_len].reshape(count, seq_len)


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, max_tokens: int = 0, progress: bool = True, top1: bool = False) -> dict:
    """exp(mean next-token negative log-likelihood) of `model` on `text` under the protocol above:
    `model` is a PyTorch causal LM or has `window_logits(ids [T]) -> [T, vocab]` (canao.lm.gguf.GGUFModel,
    llama.cpp on a GGUF file). `max_tokens` > 0 scores only the text's first that many tokens.
    With `top1`, "top1" holds the model's most likely next token at every scored position
    ([tokens] int64), so two models' greedy choices on the same text compare position by position."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens: must be >= 0, got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    window_logits = getattr(model, "window_logits", None)
    if window_logits is None:
        ids = ids.to(next(model.parameters()).device)

        def window_logits(window: torch.Tensor) -> torch.Tensor:
            return model(input_ids=window[None]).logits[0]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    windows, end = [], 0
    for begin in range(0, len(ids), PPL_STRIDE):
        windows.append((begin, min(begin + PPL_WINDOW, len(ids)), max(end, begin + 1)))  # (begin, end, first scored)
        end = windows[-1][1]
        if end == len(ids):
            break
    nll, choices = 0.0, []
    for begin, end, first in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        logits = window_logits(ids[begin:end])[first - begin - 1 : -1].float()  # [end - first, V]
        nll += float(torch.nn.functional.cross_entropy(logits, ids[first:end], reduction="sum"))
        if top1:
            choices.append(logits.argmax(-1))
    scored = len(ids) - 1
    result = {"perplexity": math.exp(nll / scored), "tokens": scored, "window": PPL_WINDOW, "stride": PPL_STRIDE}
    if top1:
        result["top1"] = torch.cat(choices).cpu()
    return result


def prompt_windows(tokenizer, text: str, count: int, length: int) -> torch.Tensor:
    """`count` prompts of `length` tokens spread evenly over `text` (the first at its start, the
    last at its end), [count, length] int64: the same prompts for every model scored on `text`."""
    if count < 1 or length < 1:
        raise ValueError(f"prompts: need count >= 1 and length >= 1, got {count} and {length}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one prompt of {length}")
    return torch.stack([ids[start:start + length] for start in torch.linspace(0, len(ids) - length, count).long()])


@torch.inference_mode()
def greedy_tokens(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Each prompt's greedy continuation by a PyTorch causal LM, [P, new_tokens]: the most likely
    token at every step, end-of-sequence tokens included (it does not stop a row)."""
    prompts = prompts.to(next(model.parameters()).device)
    out = model(input_ids=prompts, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]  # [P, 1]
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1).cpu()


def greedy_agreement(model, reference_tokens: torch.Tensor, prompts: torch.Tensor) -> float:
    """The share of `reference_tokens` (a teacher's `greedy_tokens` on `prompts`) that `model`'s own
    greedy continuations of the same prompts repeat, position by position: generation's "does it
    write what the teacher writes", where the teacher-forced top-1 agreement scores each position
    on the teacher's own text."""
    return float((greedy_tokens(model, prompts, reference_tokens.shape[1]) == reference_tokens).double().mean())
