"""The deploy stage's backend rule and the stage cache's keys."""

import pytest

from canao.config import PROFILES, load_config
from canao.manifest import write_manifest
from canao.stages import RUNNERS, cache_key, choose_backend


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


def test_cache_key_follows_config_device_and_input_content(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"a")
    write_manifest(model, "teacher", {}, {})
    cfg = load_config("compile", "tiny")
    key = cache_key("compile", cfg, "x86-1t", {"model": model})
    assert key == cache_key("compile", load_config("compile", "tiny"), "x86-1t", {"model": model})
    assert key != cache_key("compile", load_config("compile", "tiny", overrides=["trials=1"]), "x86-1t",
                            {"model": model})
    assert key != cache_key("compile", cfg, "x86-2t", {"model": model})
    (model / "weights.bin").write_bytes(b"b")
    write_manifest(model, "teacher", {}, {})
    assert key != cache_key("compile", cfg, "x86-1t", {"model": model})
    with pytest.raises(FileNotFoundError, match="incomplete"):
        cache_key("compile", cfg, "x86-1t", {"model": tmp_path / "missing"})


@pytest.mark.parametrize("profile", PROFILES)
def test_every_pipeline_stage_has_a_config_in_every_profile(profile):
    for config_name, _ in RUNNERS.values():
        load_config(config_name, profile)
