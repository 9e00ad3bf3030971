import json
import subprocess
from pathlib import Path

import pytest

from canao.config import PROJECT_ROOT, resolve_path

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


@pytest.fixture(scope="session")
def litert_env():
    """Builds the converter environment the way a fresh clone gets it (about a minute, once)."""
    done = subprocess.run(["make", "-C", str(PROJECT_ROOT), "litert-env"], capture_output=True, text=True)
    assert done.returncode == 0, f"make litert-env failed:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """The tiny profile's random decoder (SmolLM2's tokenizer and special tokens), saved once."""
    from canao.config import load_config
    from canao.models.llama_lm import save_teacher

    path = tmp_path_factory.mktemp("lm") / "tiny-lm"
    save_teacher(load_config("lm-teacher", "tiny"), path)
    return path
