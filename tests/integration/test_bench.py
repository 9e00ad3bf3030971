"""The benchmark through the device lab: TVM on the device server, peers pinned alike."""

import json

import pytest
import yaml

from canao.cli.main import main
from canao.lab import devices
from canao.qa.config import BertShape
from canao.qa.model import init_qa_model
from tests.integration.conftest import running_lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    project = yaml.safe_load(devices.devices_file(devices.DEVICES_FILE).read_text())
    profiles = {"x86-1t": project["x86-1t"], "x86-2t": {**project["x86-2t"], "local": False}}  # known, no server
    with running_lab(tmp_path_factory.mktemp("lab"), profiles) as state:
        yield state


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tokenizer, litert_env):
    root = tmp_path_factory.mktemp("bench")
    model = root / "model"
    init_qa_model("random", BertShape(num_layers=1, hidden_size=32, num_heads=2, ffn_size=64), 0).save_pretrained(model)
    tokenizer.save_pretrained(model)
    out = root / "compiled"
    assert main(["compile", "--profile", "tiny", "--model", str(model), "--device", "x86-1t", "--seq-len", "32",
                 "--set", f"tuning_dir={root / 'tuning'}", "--set", "peers=[onnxruntime, litert]",
                 "--out", str(out)]) == 0
    return model, out


def test_bench_times_every_backend_on_the_device(lab, artifact, tmp_path, capsys):
    model, compiled = artifact
    capsys.readouterr()
    out = tmp_path / "records.json"
    assert main(["bench", "--profile", "tiny", "--model", str(model), "--device", "x86-1t", "--seq-len", "32",
                 "--backends", "tvm,litert,onnxruntime,torch", "--artifact", str(compiled), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    records = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    assert set(records) == {"tvm", "litert", "onnxruntime", "torch"}
    for r in records.values():
        assert r["runs"] == 5 and 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"]
        assert r["threads"] == 1 and r["cores"] == [0] and r["version"]
    assert records["tvm"]["numerics_max_abs_diff"] <= 1e-3
    assert "| x86-1t | 32 | litert |" in table and "1.00x" in table


def test_bench_refuses_unknown_backends_and_other_devices(lab, artifact, tmp_path, capsys):
    model, compiled = artifact
    args = ["bench", "--profile", "tiny", "--model", str(model), "--seq-len", "32", "--artifact", str(compiled),
            "--out", str(tmp_path / "r.json")]
    assert main([*args, "--device", "x86-1t", "--backends", "tvm,tensorrt"]) == 2
    assert "--backends: unknown tensorrt" in capsys.readouterr().err
    assert main([*args, "--device", "x86-1t", "--backends", "tvm,litert-int8"]) == 2
    assert "has no litert-int8 export" in capsys.readouterr().err
    assert main([*args, "--device", "x86-2t", "--backends", "tvm"]) == 2
    assert "compiled for x86-1t, not for x86-2t" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
