import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from canao.config import PROJECT_ROOT, resolve_path
from canao.lab.devices import get_device
from canao.qa.data import SquadExample

SQUAD_DIR = resolve_path("../shared/data/squad")
TRAIN_FILE = SQUAD_DIR / "train-subset-v1.1.json"
DEV_FILE = SQUAD_DIR / "dev-a-v1.1.json"

# What a run writes, measured on a fresh clone (GB): pytest's temporary directory holds 0.85 at
# the end; the LiteRT converter's environment (.venv-litert), built by the first test that needs
# it, is 2.1.
TMP_NEEDS_GB = 1.0
LITERT_ENV_NEEDS_GB = 2.5


def pytest_sessionstart(session):
    """A full disk fails tests all over the suite with errors that do not say why (a truncated
    file, a venv that does not install): refuse to start instead, naming the folder."""
    needs: dict[int, list] = {}  # filesystem -> [a folder on it, GB the run writes there]
    litert_env = PROJECT_ROOT / ".venv-litert"
    for folder, gb in ((Path(tempfile.gettempdir()), TMP_NEEDS_GB),
                       (PROJECT_ROOT, 0.0 if litert_env.is_dir() else LITERT_ENV_NEEDS_GB)):
        needs.setdefault(os.stat(folder).st_dev, [folder, 0.0])[1] += gb
    for folder, gb in needs.values():
        free = shutil.disk_usage(folder).free / 1e9
        if free < gb:
            pytest.exit(f"{folder}: {free:.1f} GB free on its disk; the tests need about {gb:.1f} GB "
                        "(pytest's temporary files, and .venv-litert if it is not built yet)", returncode=3)


def squad_file(path: Path, articles: list) -> Path:
    path.write_text(json.dumps({"version": "1.1", "data": articles}))
    return path


def article(context: str, qas: list, title: str = "Test") -> dict:
    return {"title": title, "paragraphs": [{"context": context, "qas": qas}]}


def qa(qid: str, question: str, *answers: tuple[str, int]) -> dict:
    return {"id": qid, "question": question, "answers": [{"text": t, "answer_start": s} for t, s in answers]}


@pytest.fixture(scope="session")
def tokenizer():
    from canao.qa.model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def litert_env():
    """Builds the converter environment the way a fresh clone gets it (about a minute, once): one
    test worker builds it while the others wait (two pips in one venv break it)."""
    lock = Path(tempfile.gettempdir()) / f"canao-litert-env-{hashlib.sha256(bytes(PROJECT_ROOT)).hexdigest()[:12]}.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = subprocess.run(["make", "-C", str(PROJECT_ROOT), "litert-env"], capture_output=True, text=True)
    assert done.returncode == 0, f"make litert-env failed:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="session")
def memorized_qa(tmp_path_factory) -> tuple[Path, SquadExample]:
    """A tiny random BERT trained by the teacher stage until it answers one SQuAD training
    question right, so serving tests can check the right answer: (model dir, the question)."""
    from canao.cli.main import main
    from canao.manifest import read_manifest
    from canao.qa.data import load_squad

    first_paragraph = json.loads(TRAIN_FILE.read_text())["data"][0]
    context = first_paragraph["paragraphs"][0]["context"]
    question = first_paragraph["paragraphs"][0]["qas"][1]  # "What is in front of the Notre Dame Main Building?"
    directory = tmp_path_factory.mktemp("memorized")
    data = squad_file(directory / "one-question.json", [article(context, [question], first_paragraph["title"])])
    out = directory / "model"
    sets = [f"data.train_file={data}", f"data.eval_file={data}", "train.epochs=30", "train.batch_size=1",
            "train.learning_rate=3e-3", "train.checkpoint_every=1000"]
    assert main(["teacher", "--profile", "tiny", *(f"--set={s}" for s in sets), "--out", str(out)]) == 0
    assert read_manifest(out)["metrics"]["exact_match"] == 100.0, "the tiny model did not learn its one question"
    return out, load_squad(data)[0]


@pytest.fixture(scope="session")
def compiled_qa(memorized_qa, tmp_path_factory) -> Path:
    """memorized_qa compiled untuned for x86-1t with ONNX Runtime as its peer: the artifact dir."""
    from canao.profiles import load_config
    from canao.qa.compile import compile_model

    tmp = tmp_path_factory.mktemp("compiled-qa")
    cfg = load_config("compile", "tiny", overrides=[f"tuning_dir={tmp / 'tuning'}", "peers=[onnxruntime]"])
    compile_model(memorized_qa[0], get_device("x86-1t"), cfg, tmp / "artifact")
    return tmp / "artifact"


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """The tiny profile's random decoder (SmolLM2's tokenizer and special tokens), saved once."""
    from canao.lm.teacher import save_teacher
    from canao.profiles import load_config

    path = tmp_path_factory.mktemp("lm") / "tiny-lm"
    save_teacher(load_config("lm-teacher", "tiny"), path)
    return path


@pytest.fixture(scope="session")
def compiled_lm(tiny_lm, tmp_path_factory) -> tuple[Path, dict]:
    """tiny_lm compiled untuned for x86-1t (context window 48, prefill 16): (artifact dir, its manifest)."""
    from canao.lm.compile import compile_lm
    from canao.profiles import load_config

    tmp = tmp_path_factory.mktemp("compiled-lm")
    cfg = load_config("compile-lm", "tiny", overrides=[f"tuning_dir={tmp / 'tuning'}"])
    manifest = compile_lm(tiny_lm, get_device("x86-1t"), cfg, tmp / "out")
    return tmp / "out", manifest
