"""augment: new inputs for the teacher to label, made from the training questions alone.

A student distilled only on the windows the teacher was fine-tuned on learns targets the
teacher has memorised (nearly one-hot there); these inputs are new to the teacher, so its
outputs on them carry what it generalises. In the manner of TinyBERT's augmentation, adapted
to extractive QA. Every copy comes from one training question and the paragraphs of its own
article among the training questions, drawn with the config's seed: the same questions and
config make the same copies.

- crop: the context cut to a random run of whole sentences that still holds the gold answer,
  so its windows begin and end elsewhere (other offsets, other lengths);
- repair: the question asked of another paragraph of its article that does not contain the
  answer's text; the copy has no gold answer, so every window of it is labelled as having none;
- replace: a share of the context's words outside the gold answer swapped for words drawn from
  the article's paragraphs.

A crop or replace copy keeps the first gold answer, its offset moved with the text before it.
"""

from __future__ import annotations

import random
import re

from canao.qa.config import AugmentConfig
from canao.qa.data import Answer, SquadExample

SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
WORD = re.compile(r"\S+")


def with_copies(examples: list[SquadExample], cfg: AugmentConfig) -> list[SquadExample]:
    """`examples` followed by the copies `cfg` asks for (none by default)."""
    return examples + augment(examples, cfg) if cfg.copies else examples


def augment(examples: list[SquadExample], cfg: AugmentConfig) -> list[SquadExample]:
    """The copies `cfg` asks for of each of `examples` that has a gold answer (the originals not
    included), question by question in a fixed order."""
    rng = random.Random(cfg.seed)
    paragraphs: dict[str, list[str]] = {}
    for ex in examples:
        contexts = paragraphs.setdefault(ex.article, [])
        if ex.context not in contexts:
            contexts.append(ex.context)
    words = {article: sorted({w for c in contexts for w in WORD.findall(c)})
             for article, contexts in paragraphs.items()}
    copies = []
    for ex in examples:
        if not ex.answers:
            continue
        answer = ex.answers[0]
        for k in range(cfg.crop):
            copies.append(_crop(ex, answer, rng, f"{ex.qid}#crop{k}"))
        others = [c for c in paragraphs[ex.article] if c != ex.context and answer.text not in c]
        for k in range(cfg.repair if others else 0):
            copies.append(SquadExample(f"{ex.qid}#repair{k}", ex.question, rng.choice(others), (), ex.article))
        for k in range(cfg.replace):
            copies.append(_replace(ex, answer, words[ex.article], cfg.replace_rate, rng, f"{ex.qid}#replace{k}"))
    return copies


def _crop(ex: SquadExample, answer: Answer, rng: random.Random, qid: str) -> SquadExample:
    breaks = list(SENTENCE_BREAK.finditer(ex.context))
    starts = [0] + [b.end() for b in breaks]  # sentence i is context[starts[i]:ends[i]]
    ends = [b.start() for b in breaks] + [len(ex.context)]
    first = max(i for i, s in enumerate(starts) if s <= answer.start)
    last = min(i for i, e in enumerate(ends) if e >= answer.start + len(answer.text))
    lo, hi = starts[rng.randint(0, first)], ends[rng.randint(max(first, last), len(ends) - 1)]
    return SquadExample(qid, ex.question, ex.context[lo:hi], (Answer(answer.text, answer.start - lo),), ex.article)


def _replace(ex: SquadExample, answer: Answer, pool: list[str], rate: float, rng: random.Random,
             qid: str) -> SquadExample:
    answer_end = answer.start + len(answer.text)
    free = [w for w in WORD.finditer(ex.context) if w.end() <= answer.start or w.start() >= answer_end]
    chosen = sorted(rng.sample(free, round(rate * len(free))), key=lambda w: w.start())
    pieces, at, shift = [], 0, 0
    for w in chosen:
        new = rng.choice(pool)
        pieces += [ex.context[at : w.start()], new]
        at = w.end()
        if w.end() <= answer.start:
            shift += len(new) - len(w.group())
    context = "".join(pieces) + ex.context[at:]
    return SquadExample(qid, ex.question, context, (Answer(answer.text, answer.start + shift),), ex.article)
