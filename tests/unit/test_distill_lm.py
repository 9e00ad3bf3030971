"""distill-lm on the tiny profile: the decoder supernet learns, is reused, refuses another
config, and a killed run resumes to the same weights."""

import dataclasses
import json

import pytest
import torch

from canao.cli.main import main
from canao.codesign.elastic import extract
from canao.codesign.kd import CHECKPOINT, IMPORTANCE_FILE, SUPERNET_DIR
from canao.config import ConfigError
from canao.lm import distill as lm_distill
from canao.lm.distill import lm_kd_loss, load_decoder_supernet
from canao.lm.space import DecoderSubnet
from canao.manifest import verify_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-data") / "corpus"
    assert main(["lm-data", "--profile", "tiny", "--out", str(out)]) == 0
    return out


def distill(teacher, corpus, out, *overrides) -> int:
    sets = [f"--set={s}" for s in overrides]
    return main(["distill-lm", "--profile", "tiny", *sets, "--teacher", str(teacher), "--data", str(corpus),
                 "--out", str(out)])


@pytest.fixture(scope="module")
def supernet_dir(tiny_lm, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill-lm") / "supernet"
    assert distill(tiny_lm, corpus, out) == 0
    return out


def test_the_smallest_subnet_moves_towards_the_teacher(supernet_dir, capsys):
    manifest = verify_manifest(supernet_dir)
    m = manifest["metrics"]
    assert m["steps"] == 6 and m["train_windows"] == 24
    assert m["heldout_kl_smallest"]["after"] < m["heldout_kl_smallest"]["before"]
    assert set(m["heldout_perplexity"]) == {"teacher", "largest", "smallest"}
    assert m["block_order"] == [0, 1] and len(m["block_influence"]) == 2  # the first and the last block first
    assert manifest["teacher_shape"] == {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
                                         "ffn_size": 128}
    assert (supernet_dir / IMPORTANCE_FILE).is_file() and not (supernet_dir / "checkpoints").exists()
    supernet, _ = load_decoder_supernet(supernet_dir)
    student = extract(supernet, DecoderSubnet(1, 1, 32))
    assert student.config.num_hidden_layers == 1 and student.config.num_key_value_heads == 1


def test_same_config_reuses_and_another_is_refused(tiny_lm, corpus, supernet_dir, capsys):
    before = (supernet_dir / "manifest.json").read_text()
    assert distill(tiny_lm, corpus, supernet_dir) == 0
    assert "already made; reusing it" in capsys.readouterr().out
    assert distill(tiny_lm, corpus, supernet_dir, "seed=1") == 2
    assert "holds a decoder supernet made with another config" in capsys.readouterr().err
    assert (supernet_dir / "manifest.json").read_text() == before
    assert distill(tiny_lm, tiny_lm, supernet_dir.parent / "other") == 2
    assert "not an LM corpus (lm-data)" in capsys.readouterr().err


def test_a_killed_run_resumes_to_the_same_weights(tiny_lm, corpus, supernet_dir, tmp_path, monkeypatch):
    loss, calls = lm_kd_loss, 0

    def dies_in_step_three(*args):
        nonlocal calls
        calls += 1
        if calls == 7:  # three subnets per step: the first of step 3, after the checkpoint of step 2
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(lm_distill, "lm_kd_loss", dies_in_step_three)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        distill(tiny_lm, corpus, out)
    state = torch.load(out / "checkpoints" / CHECKPOINT, weights_only=False)
    assert state["step"] == 2 and (out / "checkpoints" / IMPORTANCE_FILE).is_file()
    monkeypatch.setattr(lm_distill, "lm_kd_loss", loss)
    assert distill(tiny_lm, corpus, out) == 0
    weights = f"{SUPERNET_DIR}/model.safetensors"
    assert verify_manifest(out)["files"][weights] == verify_manifest(supernet_dir)["files"][weights]
    assert json.loads((out / "manifest.json").read_text())["metrics"]["heldout_kl_smallest"] == \
        verify_manifest(supernet_dir)["metrics"]["heldout_kl_smallest"]


def test_the_token_embedding_stays_the_teachers(tiny_lm, supernet_dir):
    from canao.lm.model import load_causal_lm

    supernet, _ = load_decoder_supernet(supernet_dir)
    teacher = load_causal_lm(tiny_lm)
    assert torch.equal(supernet.model.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert not torch.equal(supernet.model.model.layers[0].mlp.up_proj.weight,
                           teacher.model.layers[0].mlp.up_proj.weight)


def test_a_training_device_torch_lacks_is_refused(tiny_lm, corpus, tmp_path, capsys):
    assert distill(tiny_lm, corpus, tmp_path / "tpu", "torch_device=tpu") == 2
    assert "torch_device: must be one of cpu, cuda, got 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert distill(tiny_lm, corpus, tmp_path / "cuda", "torch_device=cuda") == 2
        assert "torch sees no GPU here" in capsys.readouterr().err
        assert not (tmp_path / "cuda").exists()


def test_the_teachers_own_text_is_written_once_reproducibly_and_trained_on(tiny_lm, corpus, tmp_path):
    from canao.lm.augment import GENERATED_FILE, generate, openings, teacher_file
    from canao.lm.config import LMAugmentConfig
    from canao.lm.data import HELDOUT_FILE, TRAIN_FILE

    train = (corpus / TRAIN_FILE).read_text()
    heldout = (corpus / HELDOUT_FILE).read_text()
    chosen = openings(train, 3, seed=0)
    assert len(set(chosen)) == 3 and all(o in train and o not in heldout for o in chosen)
    cfg = LMAugmentConfig(prompts=3, prompt_tokens=8, new_tokens=12, seed=0, threads=1)
    gguf = teacher_file(tiny_lm, tmp_path)
    first = generate(cfg, gguf, train, tmp_path / "a.txt")
    again = generate(cfg, gguf, train, tmp_path / "b.txt")
    other = generate(dataclasses.replace(cfg, seed=1), gguf, train, tmp_path / "c.txt")
    assert first["sha256"] == again["sha256"] != other["sha256"]  # one seed, one text
    assert first["passages"] == 3 and 0 < first["new_tokens"] <= 36 and first["threads"] == 1
    out = tmp_path / "augmented"
    assert distill(tiny_lm, corpus, out, "augment.prompts=3", "augment.prompt_tokens=8", "augment.new_tokens=12",
                   "augment.threads=1") == 0
    manifest = verify_manifest(out)
    assert manifest["files"][GENERATED_FILE] == manifest["metrics"]["generated"]["sha256"] == first["sha256"]
    assert manifest["metrics"]["train_windows"] > 24  # the corpus's 24 windows and the teacher's text
    with pytest.raises(ConfigError, match="augment.temperature: must be > 0"):
        LMAugmentConfig(temperature=0)
