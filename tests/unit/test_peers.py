"""Peer runtimes on a tiny random BERT: exports match PyTorch, int8 stays close, errors are clear."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

from canao.codesign.elastic import extract
from canao.compile import peers
from canao.compile.relax import max_abs_diff
from canao.qa.compile import export, export_litert
from canao.qa.config import BertShape
from canao.qa.model import Supernet, example_inputs, init_qa_model, load_for_export
from canao.qa.predictor import TorchRunner, backend_runner, runner_factory
from canao.qa.space import SubnetConfig

SEQ_LEN = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qa")
    init_qa_model("random", BertShape(), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def span_model(model_dir):
    return load_for_export(model_dir)


@pytest.fixture(scope="module")
def inputs():
    return tuple(x.numpy() for x in example_inputs(SEQ_LEN))


@pytest.fixture(scope="module")
def reference(model_dir, inputs):
    return TorchRunner(model_dir, threads=1)(*inputs)


def cosine(outputs, reference) -> float:
    a, b = np.concatenate([o.ravel() for o in outputs]), np.concatenate([r.ravel() for r in reference])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(
    "name, atol, min_cosine",
    [
        ("onnxruntime", 1e-4, None),
        ("onnxruntime-int8", None, 0.99),
        ("litert", 1e-3, None),
        ("litert-int8", None, 0.99),
    ],
)
def test_peer_matches_pytorch(name, atol, min_cosine, model_dir, span_model, inputs, reference, tmp_path, request):
    if name.startswith("litert"):
        request.getfixturevalue("litert_env")
    path = export(name, model_dir, span_model, SEQ_LEN, tmp_path, int8_dot=True)
    outputs = backend_runner(name, path, threads=1)(*inputs)
    assert [(o.dtype, o.shape) for o in outputs] == [(np.float32, (1, SEQ_LEN))] * 2
    if atol is not None:
        assert max_abs_diff(outputs, reference) < atol
    if min_cosine is not None:
        assert cosine(outputs, reference) > min_cosine
    if name.endswith("-int8"):  # int8 weights: well under 2 bytes a parameter, fp32 would take 4
        assert path.stat().st_size < 2 * sum(p.numel() for p in span_model.parameters())


def int8_weight_range(path) -> int:
    return max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max())
               for t in onnx.load(path).graph.initializer if t.data_type == onnx.TensorProto.INT8)


def test_onnx_int8_keeps_7_bit_weights_for_a_cpu_without_int8_dot_products(model_dir, span_model, inputs,
                                                                              reference, tmp_path):
    """Without VNNI or dotprod, ONNX Runtime's u8 x s8 products saturate 16-bit sums: 7-bit weights
    (reduce_range) avoid it; with them the weights use all 8 bits."""
    with_dot = export("onnxruntime-int8", model_dir, span_model, SEQ_LEN, tmp_path / "dot", int8_dot=True)
    without = export("onnxruntime-int8", model_dir, span_model, SEQ_LEN, tmp_path / "no-dot", int8_dot=False)
    assert int8_weight_range(with_dot) == 127
    assert int8_weight_range(without) <= 64
    assert cosine(backend_runner("onnxruntime-int8", without, threads=1)(*inputs), reference) > 0.99


def test_unknown_backend_is_named(model_dir, span_model, tmp_path):
    with pytest.raises(ValueError, match="'tensorrt': unknown"):
        export("tensorrt", model_dir, span_model, SEQ_LEN, tmp_path, int8_dot=True)
    with pytest.raises(ValueError, match="'tensorrt': unknown"):
        backend_runner("tensorrt", tmp_path, threads=1)


def test_litert_export_without_its_environment_says_how_to_build_it(model_dir, tmp_path, monkeypatch):
    missing = tmp_path / "no-venv" / "bin" / "python"
    monkeypatch.setenv("CANAO_LITERT_PYTHON", str(missing))
    with pytest.raises(FileNotFoundError, match="make litert-env") as error:
        export_litert(model_dir, SEQ_LEN, tmp_path / "model.tflite")
    assert str(missing) in str(error.value)


def test_litert_conversion_failure_carries_the_converters_stderr(model_dir, tmp_path, monkeypatch):
    failing_python = tmp_path / "python"
    failing_python.write_text("#!/bin/sh\necho 'converter trace line' >&2\necho 'ValueError: bad op' >&2\nexit 3\n")
    failing_python.chmod(0o755)
    monkeypatch.setenv("CANAO_LITERT_PYTHON", str(failing_python))
    with pytest.raises(RuntimeError, match=r"exit 3[\s\S]*ValueError: bad op"):
        export_litert(model_dir, SEQ_LEN, tmp_path / "model.tflite")



def test_a_student_converts_to_litert_without_running_its_saved_modeling_file(litert_env, tmp_path):
    """The converter's environment loads a student with canao's classes too (canao.qa.litert)."""
    student = extract(Supernet(init_qa_model("random", BertShape(3, 48, 3, 96), seed=0)),
                      SubnetConfig(2, 32, (2, 1), (96, 32)))
    student.save_pretrained(tmp_path / "student")
    marker = tmp_path / "the-modeling-file-ran"
    (tmp_path / "student" / "modeling_canao_bert.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    inputs = tuple(x.numpy() for x in example_inputs(SEQ_LEN))
    path = export_litert(tmp_path / "student", SEQ_LEN, tmp_path / "student.tflite")
    outputs = backend_runner("litert", path, threads=1)(*inputs)
    assert max_abs_diff(outputs, TorchRunner(tmp_path / "student", threads=1)(*inputs)) < 1e-3
    assert not marker.exists()


def test_a_peers_timing_child_imports_its_runtime_without_pytorch():
    # Every peer is timed in a fresh process (canao.compile.peers.timed_calls): one that imported
    # PyTorch and transformers too would spend seconds starting for every timing.
    factory = runner_factory("onnxruntime", "model.onnx", threads=1)
    assert factory.func is peers.OnnxRunner
    code = "import sys, canao.compile.peers; print(sorted({'torch', 'transformers', 'tvm'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
