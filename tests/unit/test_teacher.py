"""The teacher stage on the tiny profile: train, manifest, reuse, resume, eval and answer."""

import json

import pytest
import torch
from transformers import AutoModelForQuestionAnswering

from canao.cli.main import main
from canao.codesign.kd import CHECKPOINT, fit
from canao.config import TrainConfig
from canao.manifest import verify_manifest
from canao.profiles import load_config
from canao.qa.data import build_features, load_squad
from canao.qa.model import init_qa_model, minilm_dir
from canao.qa.teacher import span_loss
from tests.conftest import DEV_FILE, TRAIN_FILE, article, qa, squad_file

CONTEXT = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy."


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "model"
    assert main(["teacher", "--profile", "tiny", "--out", str(out)]) == 0
    return out


def test_teacher_writes_a_loadable_model_with_a_verified_manifest(teacher_dir, capsys):
    manifest = verify_manifest(teacher_dir)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert not (teacher_dir / "checkpoints").exists()
    assert manifest["stage"] == "teacher"
    assert manifest["config"]["init"] == "random"
    assert manifest["metrics"]["questions"] == 16
    assert 0 <= manifest["metrics"]["f1"] <= 100
    assert manifest["inputs"]["train_file"]["path"] == str(TRAIN_FILE)
    model = AutoModelForQuestionAnswering.from_pretrained(teacher_dir)
    assert model.config.num_hidden_layers == 2


def test_same_config_reuses_and_another_config_is_refused(teacher_dir, capsys):
    before = (teacher_dir / "manifest.json").read_text()
    assert main(["teacher", "--profile", "tiny", "--out", str(teacher_dir)]) == 0
    assert "already made; reusing it" in capsys.readouterr().out
    assert main(["teacher", "--profile", "tiny", "--set", "seed=1", "--out", str(teacher_dir)]) == 2
    assert "holds a teacher made with another config" in capsys.readouterr().err
    assert (teacher_dir / "manifest.json").read_text() == before


def test_bad_data_file_is_named_and_nothing_is_written(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"title": "x"}]}')
    out = tmp_path / "never"
    assert main(["teacher", "--profile", "tiny", "--set", f"data.train_file={bad}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "missing field 'paragraphs'" in err
    assert not out.exists()


def test_eval_qa_predictions_score_the_same_with_squad_score(teacher_dir, tmp_path, capsys):
    data = squad_file(tmp_path / "data.json", [article(CONTEXT, [
        qa("a", "Who gave their name to Normandy?", ("The Normans", 0)),
        qa("b", "When?", ("10th and 11th centuries", CONTEXT.index("10th"))),
    ])])
    preds = tmp_path / "preds.json"
    assert main(["eval-qa", "--model", str(teacher_dir), "--data", str(data), "--out", str(preds)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["questions"] == 2
    assert set(json.loads(preds.read_text())) == {"a", "b"}
    assert main(["squad-score", str(data), str(preds)]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["f1"] == pytest.approx(evaluated["f1"], abs=1e-3)
    assert scored["exact_match"] == pytest.approx(evaluated["exact_match"], abs=1e-3)


def test_qa_answers_from_the_context(teacher_dir, capsys):
    assert main(["qa", "--model", str(teacher_dir), "--context", CONTEXT, "--question", "Who?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == CONTEXT[out["start"] : out["end"]]
    assert out["latency_ms"] > 0 and 0 <= out["score"] <= 1
    assert main(["qa", "--model", str(teacher_dir), "--context", CONTEXT, "--question", "  "]) == 2
    assert "--question: must not be empty" in capsys.readouterr().err
    assert main(["qa", "--model", str(teacher_dir / "nope"), "--context", CONTEXT, "--question", "Who?"]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, tokenizer):
    cfg = load_config("teacher", "tiny")
    features = build_features(load_squad(TRAIN_FILE, 24), tokenizer, cfg.features)
    train = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3, bf16=False, checkpoint_every=3)

    def run(work_dir, loss_fn=span_loss):
        model = init_qa_model("random", cfg.random_shape, seed=0)
        fit(model, features, loss_fn, train, 0, work_dir, fingerprint="f")
        return model

    calls = 0

    def dies_at_step_five(model, feats, index):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        return span_loss(model, feats, index)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", dies_at_step_five)
    assert (tmp_path / "killed" / CHECKPOINT).is_file()
    resumed = run(tmp_path / "killed")
    straight = run(tmp_path / "straight")
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="a checkpoint of another config"):
        fit(init_qa_model("random", cfg.random_shape, 0), features, span_loss, train, 0, tmp_path / "killed", "g")


def test_minilm_is_found_through_its_package():
    assert (minilm_dir() / "model.safetensors").is_file()
    assert load_squad(DEV_FILE, 1)
