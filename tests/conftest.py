import json
from pathlib import Path

import pytest

from canao.config import resolve_path

SQUAD_DIR = resolve_path("../shared/data/squad")
TRAIN_FILE = SQUAD_DIR / "train-subset-v1.1.json"
DEV_FILE = SQUAD_DIR / "dev-a-v1.1.json"


def squad_file(path: Path, articles: list) -> Path:
    path.write_text(json.dumps({"version": "1.1", "data": articles}))
    return path


def article(context: str, qas: list, title: str = "Test") -> dict:
    return {"title": title, "paragraphs": [{"context": context, "qas": qas}]}


def qa(qid: str, question: str, *answers: tuple[str, int]) -> dict:
    return {"id": qid, "question": question, "answers": [{"text": t, "answer_start": s} for t, s in answers]}


@pytest.fixture(scope="session")
def tokenizer():
    from canao.models.bert_qa import load_tokenizer

    return load_tokenizer()
