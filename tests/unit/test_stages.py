"""The deploy stage's backend rule and the stage cache's keys."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from canao import hardware
from canao.config import PROFILES
from canao.lab.devices import get_device
from canao.manifest import read_manifest, sha256_file, verify_manifest, write_manifest
from canao.mlops.stages import RUNNERS, Context, cache_key, choose_backend, execute
from canao.profiles import load_config


def record(backend, p50, diff):
    return {"backend": backend, "p50_ms": p50, "p90_ms": p50 * 1.1, "numerics_max_abs_diff": diff}


def test_fastest_backend_within_its_numerics_bound_is_chosen():
    records = [record("tvm", 3.0, 2e-4), record("litert", 4.0, 1e-5), record("litert-int8", 1.5, 0.3),
               record("onnxruntime-int8", 1.0, 0.9), record("torch", 9.0, 0.0)]
    choice = choose_backend(records, fp32_tol=1e-3, int8_tol=0.5)
    assert choice["backend"] == "litert-int8" and choice["p50_ms"] == 1.5
    judged = {c["backend"]: c for c in choice["candidates"]}
    assert not judged["onnxruntime-int8"]["passes"] and judged["onnxruntime-int8"]["tolerance"] == 0.5
    assert judged["tvm"]["passes"] and judged["tvm"]["tolerance"] == 1e-3
    # An fp32 backend is held to the fp32 tolerance however fast it is.
    choice = choose_backend([record("tvm", 1.0, 2e-3), record("litert", 4.0, 1e-5)], 1e-3, 0.5)
    assert choice["backend"] == "litert"


def test_no_passing_backend_is_an_error():
    with pytest.raises(ValueError, match="no measured backend passes"):
        choose_backend([record("tvm", 1.0, 0.1)], 1e-3, 0.5)


def test_cache_key_follows_config_device_hardware_and_input_content(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"a")
    write_manifest(model, "teacher", {}, {})
    cfg = load_config("compile", "tiny")
    x86_1t, x86_2t = get_device("x86-1t"), get_device("x86-2t")
    key = cache_key("compile", cfg, x86_1t, {"model": model})
    assert key == cache_key("compile", load_config("compile", "tiny"), x86_1t, {"model": model})
    assert key != cache_key("compile", load_config("compile", "tiny", overrides=["trials=1"]), x86_1t,
                            {"model": model})
    assert key != cache_key("compile", cfg, x86_2t, {"model": model})
    here = hardware.host
    with monkeypatch.context() as m:  # the same key on another CPU: what was timed or trained here does not hold
        m.setattr(hardware, "host", lambda cores=None: dataclasses.replace(here(cores), mcpu="znver3", isa=("avx2",)))
        assert key != cache_key("compile", cfg, x86_1t, {"model": model})
    (model / "weights.bin").write_bytes(b"b")
    write_manifest(model, "teacher", {}, {})
    assert key != cache_key("compile", cfg, x86_1t, {"model": model})
    with pytest.raises(FileNotFoundError, match="incomplete"):
        cache_key("compile", cfg, x86_1t, {"model": tmp_path / "missing"})


def test_the_generation_chain_runs_as_cached_stages(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path / "cache"))
    context = Context(get_device("x86-1t"))
    data, cached = execute("lm-data", "tiny", [], {}, tmp_path / "data", context)
    assert not cached and data["stage"] == "lm-data"
    supernet, cached = execute("distill-lm", "tiny", [], {"teacher": tiny_lm, "data": tmp_path / "data"},
                               tmp_path / "supernet", context)
    assert not cached and supernet["stage"] == "distill-lm" and (tmp_path / "supernet" / "manifest.json").is_file()
    again, cached = execute("distill-lm", "tiny", [], {"teacher": tiny_lm, "data": tmp_path / "data"},
                            tmp_path / "supernet-again", context)
    assert cached and again["files"] == supernet["files"] and again["config_hash"] == supernet["config_hash"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_pipeline_stage_has_a_config_in_every_profile(profile):
    for config_name, _ in RUNNERS.values():
        load_config(config_name, profile)


def test_a_stage_killed_mid_run_leaves_no_result_and_its_rerun_resumes(tmp_path, monkeypatch, capsys):
    """SIGKILL a running stage (the teacher, in its own process, as a pipeline task runs): the
    cache holds no result for it, and the same stage run again resumes from its checkpoint,
    finishes, and is then reused."""
    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path / "cache"))
    overrides = ["train.epochs=4", "train.checkpoint_every=2"]  # 56 steps
    out_dir = tmp_path / "teacher-out"
    stage = subprocess.Popen(
        [sys.executable, "-c", "import sys; from canao.lab.devices import get_device; "
         "from canao.mlops.stages import Context, execute; "
         "execute('teacher', 'tiny', sys.argv[2:], {}, sys.argv[1], Context(get_device('x86-1t')))",
         str(out_dir), *overrides],
        env={**os.environ, "CANAO_CACHE_DIR": str(tmp_path / "cache")},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "cache").glob("teacher/*/checkpoints/checkpoint.pt")):
            assert stage.poll() is None, "the stage ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        stage.kill()
        stage.wait()
    (work_dir,) = (tmp_path / "cache" / "teacher").iterdir()
    assert read_manifest(work_dir) is None and not out_dir.exists()

    manifest, cached = execute("teacher", "tiny", overrides, {}, out_dir, Context(get_device("x86-1t")))
    assert not cached and manifest["stage"] == "teacher" and read_manifest(out_dir) == manifest
    assert "resuming from" in capsys.readouterr().out
    _, cached = execute("teacher", "tiny", overrides, {}, tmp_path / "again", Context(get_device("x86-1t")))
    assert cached


def test_a_manifest_naming_a_file_outside_its_directory_is_refused(tmp_path):
    """A compiled artifact may come from a bucket: neither its files nor its backends may point outside it."""
    artifact, secret = tmp_path / "artifact", tmp_path / "secret.bin"
    artifact.mkdir()
    (artifact / "model.so").write_bytes(b"library")
    secret.write_bytes(b"secret")
    write_manifest(artifact, "compile", {}, {}, backends={"tvm": "model.so"})
    assert verify_manifest(artifact)["backends"] == {"tvm": "model.so"}
    good = json.loads((artifact / "manifest.json").read_text())
    digest = good["files"]["model.so"]
    (artifact / "link.so").symlink_to(secret)
    for files, backends, refused in (
            ({"../secret.bin": digest}, {"tvm": "../secret.bin"}, "field 'files': '../secret.bin'"),
            ({str(secret): digest}, {"tvm": str(secret)}, "field 'files'"),
            ({"link.so": sha256_file(secret)}, {"tvm": "link.so"}, "symbolic link"),
            (good["files"], {"tvm": "../secret.bin"}, "field 'backends.tvm'")):
        (artifact / "manifest.json").write_text(json.dumps({**good, "files": files, "backends": backends}))
        with pytest.raises(ValueError, match=refused):
            verify_manifest(artifact)
