"""The official SQuAD v1.1 metric: exact match and token F1 after answer normalisation.

Same definitions as the v1.1 evaluation script: lower case, punctuation removed, the
articles a/an/the removed, white space collapsed; each prediction scored against every
gold answer and the best kept; averages in percent over all questions, a question with
no prediction scoring 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from canao.data.squad import SquadExample

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def score(examples: list[SquadExample], predictions: dict[str, str]) -> dict:
    """{"exact_match", "f1"} in percent, plus how many questions had no prediction."""
    em_total = f1_total = 0.0
    missing = 0
    for ex in examples:
        if ex.qid not in predictions:
            missing += 1
            continue
        golds = [a.text for a in ex.answers]
        em_total += max(exact_match(predictions[ex.qid], g) for g in golds)
        f1_total += max(f1(predictions[ex.qid], g) for g in golds)
    n = max(len(examples), 1)
    return {"exact_match": 100.0 * em_total / n, "f1": 100.0 * f1_total / n, "missing": missing}
