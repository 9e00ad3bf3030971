"""The compiler stage on a tiny random BERT: TVM numerics, peer exports, the tuning database."""

import json

import numpy as np
import pytest

from canao.cli.main import main
from canao.compile.relax import NumericsError
from canao.lab.devices import DeviceLabError, get_device
from canao.profiles import load_config
from canao.qa.compile import compile_model
from canao.qa.config import BertShape
from canao.qa.model import example_inputs, init_qa_model, load_for_export
from canao.qa.predictor import backend_runner


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-bert")
    shape = BertShape(num_layers=1, hidden_size=32, num_heads=2, ffn_size=64)
    init_qa_model("random", shape, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cfg(tmp_path, **overrides):
    sets = [f"tuning_dir={tmp_path / 'tuning'}", *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
    return load_config("compile", "tiny", overrides=sets)


def test_tiny_bert_compiles_for_llvm_within_tolerance(tiny_model, tmp_path):
    cfg = _cfg(tmp_path)
    manifest = compile_model(tiny_model, get_device("x86-1t"), cfg, tmp_path / "out")
    numerics = manifest["metrics"]["numerics_max_abs_diff"]
    assert numerics["tvm"] <= 1e-3
    assert numerics["onnxruntime"] <= 1e-4
    assert set(manifest["backends"]) == {"tvm", "onnxruntime", "onnxruntime-int8"}
    assert manifest["config"]["target"]["kind"] == "llvm"
    for path in manifest["backends"].values():
        assert (tmp_path / "out" / path).is_file()
    # Other inputs than the ones checked at compile time: the same agreement.
    inputs = [t.numpy() for t in example_inputs(cfg.seq_len, seed=7)]
    import torch

    with torch.no_grad():
        reference = [t.numpy() for t in load_for_export(tiny_model)(*map(torch.from_numpy, inputs))]
    compiled = backend_runner("tvm", tmp_path / "out" / manifest["backends"]["tvm"], threads=1)
    for out, ref in zip(compiled(*inputs), reference, strict=True):
        np.testing.assert_allclose(out, ref, atol=1e-3)


def test_failed_numerics_write_no_artifact(tiny_model, tmp_path):
    with pytest.raises(NumericsError, match="no artifact written"):
        compile_model(tiny_model, get_device("x86-1t"), _cfg(tmp_path, numerics_tol=1e-12), tmp_path / "out")
    assert list(tmp_path.iterdir()) == [tmp_path / "tuning"]  # no output, no staging left behind


def test_unknown_device_lists_the_known_keys(tiny_model, tmp_path, capsys):
    code = main(["compile", "--profile", "tiny", "--model", str(tiny_model), "--device", "pixel-99", "--seq-len", "16",
                 "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and "device 'pixel-99': unknown (known: x86-1t" in error and not (tmp_path / "out").exists()
    with pytest.raises(DeviceLabError, match="x86-1t"):
        get_device("pixel-99")


def test_kernels_are_tuned_once_per_device(tmp_path):
    """The database is per device and shared by every compile: a second compile of the same kernels
    tunes none. Two dense layers (a few kernels) keep MetaSchedule's cost to seconds a kernel."""
    import torch

    from canao.compile.relax import build_checked

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    inputs = (torch.randn(4, 16),)
    with torch.no_grad():
        reference = [model(*inputs).numpy()]
    cfg = _cfg(tmp_path, trials=16, max_trials_per_task=1, peers=[])  # covers every kernel of the model
    device = get_device("x86-1t")
    _, first = build_checked(model, inputs, reference, device, cfg, tmp_path / "a" / "lib.so", "mlp")
    _, second = build_checked(model, inputs, reference, device, cfg, tmp_path / "b" / "lib.so", "mlp")
    assert 0 < first["tasks_tuned_now"] == first["tasks"] <= 16
    assert second["tasks_reused"] == second["tasks"] and second["tasks_tuned_now"] == 0
