"""SQuAD v1.1: load and validate, windowed features, logits -> answer text, and the metric.

Features follow the usual BERT recipe: `[CLS] question [SEP] context-window [SEP]`, long
contexts split into windows that overlap by `doc_stride` tokens, and the fast tokenizer's
character offsets map every context token back to the text, so an answer is always a
slice of the original context.

The metric is the official SQuAD v1.1 one, with the evaluation script's definitions: exact
match and token F1 after normalisation (lower case, punctuation removed, the articles
a/an/the removed, white space collapsed); each prediction scored against every gold answer
and the best kept; averages in percent over all questions, a question with no prediction
scoring 0.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from canao.qa.config import SquadFeatureConfig


class SquadFormatError(ValueError):
    """A SQuAD file that does not follow the v1.1 format; the message names where."""


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset of `text` in the context


@dataclass(frozen=True)
class SquadExample:
    qid: str
    question: str
    context: str
    answers: tuple[Answer, ...]  # gold answers; empty when only answering, or when the context holds none
    article: str = ""  # title of the article the context comes from (SQuAD files group paragraphs by it)


def load_squad(path: str | Path, limit: int = 0) -> list[SquadExample]:
    """Read a SQuAD v1.1 file; `limit` > 0 keeps the first `limit` questions in file order."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SquadFormatError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SquadFormatError(f"{path}: not valid JSON: {e}") from None
    data = _field(raw, "data", list, f"{path}")
    examples: list[SquadExample] = []
    seen: set[str] = set()
    for a, article in enumerate(data):
        where_article = f"{path}: article {a}"
        title = _field(article, "title", str, where_article)
        where_article = f"{path}: article {a} ({title!r})"
        for p, paragraph in enumerate(_field(article, "paragraphs", list, where_article)):
            where_par = f"{where_article}, paragraph {p}"
            context = _field(paragraph, "context", str, where_par)
            for q, qa in enumerate(_field(paragraph, "qas", list, where_par)):
                qid = _field(qa, "id", str, f"{where_par}, question {q}")
                where_q = f"{where_article}, question id {qid!r}"
                if qid in seen:
                    raise SquadFormatError(f"{where_q}: field 'id': duplicate question id")
                seen.add(qid)
                question = _field(qa, "question", str, where_q)
                answers = _answers(_field(qa, "answers", list, where_q), context, where_q)
                examples.append(SquadExample(qid, question, context, answers, title))
                if limit and len(examples) == limit:
                    return examples
    return examples


def _field(node, name: str, kind: type, where: str):
    if not isinstance(node, dict):
        raise SquadFormatError(f"{where}: expected an object, got {type(node).__name__}")
    if name not in node:
        raise SquadFormatError(f"{where}: missing field {name!r}")
    value = node[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SquadFormatError(
            f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _answers(items: list, context: str, where: str) -> tuple[Answer, ...]:
    if not items:
        raise SquadFormatError(f"{where}: field 'answers' is empty (v1.1 questions have answers)")
    answers = []
    for i, item in enumerate(items):
        text = _field(item, "text", str, f"{where}, answers[{i}]")
        start = _field(item, "answer_start", int, f"{where}, answers[{i}]")
        if start < 0 or context[start : start + len(text)] != text:
            found = context[max(start, 0) : max(start, 0) + len(text)]
            raise SquadFormatError(
                f"{where}: field 'answers[{i}].answer_start': {start} points at {found!r}, "
                f"not at the answer text {text!r}"
            )
        answers.append(Answer(text, start))
    return tuple(answers)


@dataclass
class Features:
    """Tokenized windows; row i belongs to example `example_index[i]`."""

    input_ids: torch.Tensor  # [n_windows, max_seq_len] int64
    token_type_ids: torch.Tensor  # [n_windows, max_seq_len] 0 = question, 1 = context
    attention_mask: torch.Tensor  # [n_windows, max_seq_len] 1 = real token
    example_index: np.ndarray  # [n_windows] index into the example list
    offsets: list[list[tuple[int, int] | None]]  # per window and token: context chars, None outside the context
    start_positions: torch.Tensor  # [n_windows] gold start token; 0 ([CLS]) when the window misses the answer
    end_positions: torch.Tensor  # [n_windows] gold end token, likewise

    def __len__(self) -> int:
        return len(self.example_index)

    def lengths(self) -> torch.Tensor:
        """[n_windows] real tokens of each window (its padding follows them)."""
        return self.attention_mask.sum(dim=1)

    def model_inputs(self, index) -> dict[str, torch.Tensor]:
        """Inputs of the windows `index`, trimmed to their longest real length."""
        mask = self.attention_mask[index]
        length = int(mask.sum(dim=1).max())
        return {
            "input_ids": self.input_ids[index, :length],
            "token_type_ids": self.token_type_ids[index, :length],
            "attention_mask": mask[:, :length],
        }


def build_features(examples: list[SquadExample], tokenizer, cfg: SquadFeatureConfig) -> Features:
    """Window every (question, context) pair; label each window with the first gold answer."""
    questions = [ex.question.lstrip() for ex in examples]
    longest = max((len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]), default=0)
    # Three special tokens and at least `doc_stride` + 1 context tokens must fit beside the question.
    room = cfg.max_seq_len - 3 - cfg.doc_stride - 1
    if longest > room:
        raise ValueError(
            f"question: {longest} tokens long; at most {room} fit with max_seq_len "
            f"{cfg.max_seq_len} and doc_stride {cfg.doc_stride}"
        )
    enc = tokenizer(
        questions,
        [ex.context for ex in examples],
        truncation="only_second",
        max_length=cfg.max_seq_len,
        stride=cfg.doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    example_index = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)
    offsets, starts, ends = [], [], []
    for w, ex_i in enumerate(example_index):
        sequence_ids = enc.sequence_ids(w)
        window = [off if sid == 1 else None for off, sid in zip(enc["offset_mapping"][w], sequence_ids, strict=True)]
        offsets.append(window)
        start, end = _label(window, examples[ex_i].answers)
        starts.append(start)
        ends.append(end)
    return Features(
        input_ids=torch.tensor(enc["input_ids"]),
        token_type_ids=torch.tensor(enc["token_type_ids"]),
        attention_mask=torch.tensor(enc["attention_mask"]),
        example_index=example_index,
        offsets=offsets,
        start_positions=torch.tensor(starts),
        end_positions=torch.tensor(ends),
    )


def _label(window: list[tuple[int, int] | None], answers: tuple[Answer, ...]) -> tuple[int, int]:
    if not answers:
        return 0, 0
    first, last = answers[0].start, answers[0].start + len(answers[0].text)
    tokens = [i for i, off in enumerate(window) if off is not None]
    if not tokens or window[tokens[0]][0] > first or window[tokens[-1]][1] < last:
        return 0, 0
    start = next(i for i in tokens if window[i][1] > first)
    end = next(i for i in reversed(tokens) if window[i][0] < last)
    return start, end


@dataclass(frozen=True)
class Prediction:
    text: str
    start: int  # character offsets of `text` in the context
    end: int
    score: float  # start logit + end logit of the chosen span
    probability: float  # softmax of `score` over the n-best spans of the example


def postprocess(
    examples: list[SquadExample],
    features: Features,
    start_logits: np.ndarray,  # [n_windows, max_seq_len]
    end_logits: np.ndarray,  # [n_windows, max_seq_len]
    cfg: SquadFeatureConfig,
) -> dict[str, Prediction]:
    """Best span per example over all its windows; spans outside the context never win."""
    candidates: list[list[tuple[float, int, int]]] = [[] for _ in examples]
    for w, ex_i in enumerate(features.example_index):
        window = features.offsets[w]
        s_logits, e_logits = start_logits[w], end_logits[w]
        top_starts = np.argsort(s_logits)[::-1][: cfg.n_best]
        top_ends = np.argsort(e_logits)[::-1][: cfg.n_best]
        for s in top_starts:
            if window[s] is None:
                continue
            for e in top_ends:
                if window[e] is None or e < s or e - s + 1 > cfg.max_answer_len:
                    continue
                candidates[ex_i].append(
                    (float(s_logits[s] + e_logits[e]), window[s][0], window[e][1])
                )
    predictions = {}
    for ex, spans in zip(examples, candidates, strict=True):
        if not spans:
            predictions[ex.qid] = Prediction("", 0, 0, float("-inf"), 0.0)
            continue
        spans.sort(key=lambda c: c[0], reverse=True)
        spans = spans[: cfg.n_best]
        scores = np.array([c[0] for c in spans])
        probs = np.exp(scores - scores.max())
        score, start, end = spans[0]
        predictions[ex.qid] = Prediction(
            ex.context[start:end], start, end, score, float(probs[0] / probs.sum())
        )
    return predictions


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


def squad_score(examples: list[SquadExample], predictions: dict[str, str]) -> dict:
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
