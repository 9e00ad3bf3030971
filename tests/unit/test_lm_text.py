"""The LM corpus, its held-out slice, perplexity, and the decoder teacher stage."""

import json
import math

import pytest
import torch

from canao.cli.main import main
from canao.config import PROFILES, ConfigError, resolve_path
from canao.lm import data
from canao.lm.model import load_causal_lm, load_tokenizer
from canao.manifest import verify_manifest
from canao.profiles import load_config

WIKI = (" = Alpha = \n Alpha text one .\n = = Part = = \n More alpha .\n"
        " = Beta = \n Beta text .\n = Gamma = \n Gamma text .\n")


def test_wikitext_articles_split_on_titles_not_sections(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(WIKI)
    articles = data.wikitext_articles(path)
    assert [a.splitlines()[0] for a in articles] == [" = Alpha = ", " = Beta = ", " = Gamma = "]
    assert "More alpha" in articles[0]


def test_corpus_holds_out_the_last_articles(tmp_path):
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(WIKI)
    cfg = load_config("lm-data", "tiny", overrides=[f"wikitext_file={wiki}", "heldout_articles=1",
                                                    "max_train_chars=0"])
    manifest = data.build_corpus(cfg, tmp_path / "corpus")
    verify_manifest(tmp_path / "corpus")
    train = (tmp_path / "corpus" / data.TRAIN_FILE).read_text()
    heldout = (tmp_path / "corpus" / data.HELDOUT_FILE).read_text()
    assert "Gamma" in heldout and "Gamma" not in train
    assert "Beta text" in train and "Alpha text" in train
    assert data.squad_paragraphs(resolve_path(cfg.squad_file))[0] in train
    assert manifest["metrics"]["heldout_articles"] == 1
    with pytest.raises(ValueError, match="heldout_articles"):
        data.build_corpus(cfg.__class__(wikitext_file=str(wiki), heldout_articles=3), tmp_path / "other")
    with pytest.raises(FileExistsError):
        data.build_corpus(cfg, tmp_path / "corpus")


def test_greedy_agreement_compares_free_running_greedy_continuations(tiny_lm):
    model, tokenizer = load_causal_lm(tiny_lm).eval(), load_tokenizer(tiny_lm)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    prompts = data.prompt_windows(tokenizer, text, 3, 5)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert prompts.tolist()[0] == ids[:5] and prompts.tolist()[-1] == ids[-5:]  # spread from start to end
    tokens = data.greedy_tokens(model, prompts, 6)
    # the cached steps pick what a full forward pass over the grown sequence picks, step by step
    grown = prompts
    with torch.no_grad():
        for step in range(6):
            assert torch.equal(model(input_ids=grown).logits[:, -1].argmax(-1), tokens[:, step])
            grown = torch.cat([grown, tokens[:, step:step + 1]], 1)
    assert data.greedy_agreement(model, tokens, prompts) == 1.0
    other = tokens.clone()
    other[:, 3:] = (other[:, 3:] + 1) % model.config.vocab_size  # the last half written otherwise
    assert data.greedy_agreement(model, other, prompts) == 0.5
    with pytest.raises(ValueError, match="fewer than one prompt of"):
        data.prompt_windows(tokenizer, "fox", 2, 50)


def test_perplexity_scores_every_token_once(tiny_lm, monkeypatch):
    model, tokenizer = load_causal_lm(tiny_lm), load_tokenizer(tiny_lm)
    sample = "The quick brown fox jumps over the lazy dog. " * 6
    ids = tokenizer(sample, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    expected = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    result = data.perplexity(model, tokenizer, sample, progress=False)  # shorter than one window
    assert result["tokens"] == ids.shape[1] - 1
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert torch.equal(data.perplexity(model, tokenizer, sample, progress=False, top1=True)["top1"], logits.argmax(-1))
    monkeypatch.setattr(data, "PPL_WINDOW", 16)
    monkeypatch.setattr(data, "PPL_STRIDE", 8)
    windowed = data.perplexity(model, tokenizer, sample, progress=False)
    assert windowed["tokens"] == ids.shape[1] - 1  # sliding windows: still each token once
    assert data.perplexity(model, tokenizer, sample, max_tokens=10, progress=False)["tokens"] == 9


def test_eval_lm_cli(tiny_lm, tmp_path, capsys):
    data = tmp_path / "heldout.txt"
    data.write_text("Paris is the capital of France.\n")
    assert main(["eval-lm", "--model", str(tiny_lm), "--data", str(data)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"perplexity", "tokens", "backend"} and result["tokens"] > 0 and result["backend"] == "torch"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for path, message in ((empty, "empty"), (tmp_path / "missing.txt", "not found")):
        assert main(["eval-lm", "--model", str(tiny_lm), "--data", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("canao eval-lm: error:") and message in err


def test_lm_teacher_stage(tiny_lm):
    manifest = verify_manifest(tiny_lm)
    assert manifest["stage"] == "lm-teacher" and manifest["config"]["init"] == "random"
    tokenizer = load_tokenizer(tiny_lm)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    with pytest.raises(ConfigError, match="num_kv_heads"):
        load_config("lm-teacher", "tiny", overrides=["random_shape.num_kv_heads=3"])


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("stage", ["lm-teacher", "lm-data", "distill-lm", "latency-lm", "search-lm", "finalize-lm",
                                   "compile-lm", "bench-lm"])
def test_every_generation_profile_loads(stage, profile):
    load_config(stage, profile)
