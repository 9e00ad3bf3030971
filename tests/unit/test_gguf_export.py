"""A decoder exported to GGUF runs in llama.cpp with PyTorch's numbers (float32) or stored as the
teacher file stores it (Q4_1 matmuls), and bad input names what is wrong."""

import json
import shutil

import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from canao.cli.main import main
from canao.codesign.elastic import extract
from canao.lm.gguf import GGUF_FILE, export_gguf
from canao.lm.model import DecoderSupernet, load_causal_lm, load_tokenizer
from canao.lm.space import DecoderSubnet

PROMPT = [1, 504, 3458, 314, 4649, 30, 451, 2, 17, 288]


def llama_cpp_logits(path, ids) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@torch.inference_mode()
def torch_logits(model_dir, ids) -> np.ndarray:
    return load_causal_lm(model_dir)(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def student(tiny_lm, tmp_path_factory):
    """An extracted student with fewer layers, KV-head groups and FFN width than the tiny decoder."""
    path = tmp_path_factory.mktemp("gguf") / "student"
    extract(DecoderSupernet(load_causal_lm(tiny_lm)), DecoderSubnet(1, 1, 64)).save_pretrained(path)
    load_tokenizer(tiny_lm).save_pretrained(path)
    return path


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_float32_export_gives_pytorchs_logits_in_llama_cpp(which, tiny_lm, student, tmp_path):
    model_dir = tiny_lm if which == "teacher" else student
    path = export_gguf(model_dir, tmp_path / "model.gguf", "f32")
    reference = torch_logits(model_dir, PROMPT)
    got = llama_cpp_logits(path, PROMPT)
    # RoPE in the wrong layout or a misplaced head differs by the logits' own size (~1).
    assert np.abs(got - reference).max() < TOLERANCE["f32"]
    assert (got.argmax(-1) == reference.argmax(-1)).all()


def test_teacher_precision_stores_each_tensor_as_the_teacher_file_does(tiny_lm, tmp_path):
    from canao.lm.teacher import teacher_gguf

    quantized = export_gguf(tiny_lm, tmp_path / GGUF_FILE)
    full = export_gguf(tiny_lm, tmp_path / "f32.gguf", "f32")
    teacher_types = {t.name: t.tensor_type for t in GGUFReader(teacher_gguf()).tensors if t.name.startswith("blk.0.")}
    types = {t.name: t.tensor_type for t in GGUFReader(quantized).tensors}
    assert types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert {name: types[name] for name in teacher_types} == teacher_types
    assert quantized.stat().st_size < full.stat().st_size / 2
    metadata = GGUFReader(quantized).fields
    assert metadata["llama.block_count"].contents() == 2 and metadata["llama.embedding_length"].contents() == 64
    assert metadata["tokenizer.chat_template"].contents().startswith("{% for message in messages %}")
    # Quantized weights move the logits a little, not their scale or the model's shape.
    assert np.abs(llama_cpp_logits(quantized, PROMPT) - torch_logits(tiny_lm, PROMPT)).max() < TOLERANCE["teacher"]


# The largest logit difference from PyTorch each precision may show on the tiny decoder (logits of
# size ~1): float32 reorders sums only; 8-bit blocks move logits by hundredths, 4-bit by tenths.
TOLERANCE = {"f32": 2e-3, "q8_0": 0.05, "q4_0": 0.5, "teacher": 0.5, "q4_0-q8_0-embd": 0.5}


@pytest.mark.parametrize("precision", ["q8_0", "q4_0"])
def test_every_matrix_in_one_block_format_loads_in_llama_cpp_within_its_tolerance(precision, tiny_lm, tmp_path):
    path = export_gguf(tiny_lm, tmp_path / GGUF_FILE, precision)
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    matrices = {name for name, t in types.items() if not name.endswith("norm.weight")}
    assert "token_embd.weight" in matrices and {types[name] for name in matrices} == {
        GGMLQuantizationType[precision.upper()]}
    assert {types[name] for name in set(types) - matrices} == {GGMLQuantizationType.F32}
    reference = torch_logits(tiny_lm, PROMPT)
    assert np.abs(llama_cpp_logits(path, PROMPT) - reference).max() < TOLERANCE[precision]


def test_q4_0_with_an_8_bit_embedding_keeps_the_output_matrix_in_q8_0(tiny_lm, tmp_path):
    path = export_gguf(tiny_lm, tmp_path / GGUF_FILE, "q4_0-q8_0-embd")
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types.pop("token_embd.weight") == GGMLQuantizationType.Q8_0
    assert {t for name, t in types.items() if not name.endswith("norm.weight")} == {GGMLQuantizationType.Q4_0}
    q4_0 = llama_cpp_logits(export_gguf(tiny_lm, tmp_path / "q4_0.gguf", "q4_0"), PROMPT)
    reference = torch_logits(tiny_lm, PROMPT)
    error = np.abs(llama_cpp_logits(path, PROMPT) - reference).max()
    assert error < TOLERANCE["q4_0-q8_0-embd"] and error < np.abs(q4_0 - reference).max()


def test_export_gguf_cli_and_bad_input(tiny_lm, tmp_path, capsys):
    assert main(["export-gguf", "--model", str(tiny_lm), "--out", str(tmp_path / "x.gguf")]) == 0
    assert '"precision": "teacher"' in capsys.readouterr().out and (tmp_path / "x.gguf").is_file()
    assert main(["export-gguf", "--model", str(tmp_path / "absent")]) == 2
    assert "not a model directory (no config.json)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="precision: 'q2' is not one of teacher, f32, q8_0, q4_0, q4_0-q8_0-embd"):
        export_gguf(tiny_lm, tmp_path / "y.gguf", "q2")
    assert not list(tmp_path.glob("*.partial"))


def test_llama_cpp_decoder_streams_pytorchs_greedy_tokens(tiny_lm, tmp_path):
    """The model directory's float32 GGUF export in llama.cpp through the one streaming loop: a prompt
    over two prefill calls' worth of positions, a fresh cache per stream, the tokens PyTorch picks."""
    from canao.lm import generator

    model_dir = tmp_path / "tiny-lm"
    shutil.copytree(tiny_lm, model_dir)
    with pytest.raises(FileNotFoundError, match=r"tiny-lm: no GGUF export \(canao export-gguf --model "):
        generator.open_decoder(model_dir, 48, "llama.cpp")
    assert isinstance(generator.open_decoder(model_dir, 48), generator.TorchDecoder)  # auto, no export
    export_gguf(model_dir, model_dir / GGUF_FILE, "f32")
    decoder = generator.open_decoder(model_dir, 48)  # auto: the export
    assert isinstance(decoder, generator.LlamaCppDecoder) and decoder.eos_token_ids == (2,)
    torch_decoder = generator.TorchDecoder(model_dir, 48)
    for prompt in (PROMPT, PROMPT[3:] + PROMPT):  # the second stream must not see the first's cache
        got = [t for t, _ in generator.stream(decoder, prompt, 12, stop_at_eos=False)]
        assert got == [t for t, _ in generator.stream(torch_decoder, prompt, 12, stop_at_eos=False)]
    with pytest.raises(ValueError, match="backend: 'tvm' is not one of auto, llama.cpp, torch"):
        generator.open_decoder(model_dir, 48, "tvm")


def test_eval_lm_in_llama_cpp_scores_the_export_as_pytorch_scores_the_weights(tiny_lm, tmp_path, capsys):
    model_dir = tmp_path / "tiny-lm"
    shutil.copytree(tiny_lm, model_dir)
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 60))
    args = ["eval-lm", "--model", str(model_dir), "--data", str(text), "--threads", "1"]
    assert main([*args, "--backend", "llama.cpp"]) == 2
    assert f"{model_dir}: no model.gguf (canao export-gguf --model {model_dir} writes it)" in capsys.readouterr().err
    export_gguf(model_dir, model_dir / GGUF_FILE, "f32")
    scores = {}
    for backend in ("torch", "llama.cpp"):
        assert main([*args, "--backend", backend]) == 0
        scores[backend] = json.loads(capsys.readouterr().out)
    assert scores["torch"]["tokens"] == scores["llama.cpp"]["tokens"] > 512  # more than one window
    assert scores["llama.cpp"]["perplexity"] == pytest.approx(scores["torch"]["perplexity"], rel=1e-3)
