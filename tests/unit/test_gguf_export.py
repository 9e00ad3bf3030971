"""A decoder exported to GGUF runs in llama.cpp with PyTorch's numbers (float32) or stored as the
teacher file stores it (Q4_1 matmuls), and bad input names what is wrong."""

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
    assert np.abs(got - reference).max() < 2e-3
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
    assert np.abs(llama_cpp_logits(quantized, PROMPT) - torch_logits(tiny_lm, PROMPT)).max() < 0.5


def test_export_gguf_cli_and_bad_input(tiny_lm, tmp_path, capsys):
    assert main(["export-gguf", "--model", str(tiny_lm), "--out", str(tmp_path / "x.gguf")]) == 0
    assert '"precision": "teacher"' in capsys.readouterr().out and (tmp_path / "x.gguf").is_file()
    assert main(["export-gguf", "--model", str(tmp_path / "absent")]) == 2
    assert "not a model directory (no config.json)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="precision: 'q2' is not one of teacher, f32"):
        export_gguf(tiny_lm, tmp_path / "y.gguf", "q2")
    assert not list(tmp_path.glob("*.partial"))
