"""The generation search on the tiny profile: decoder supernet, latency models (per token, to the
first token) of compiled subnets timed on x86-1t (a local device: no lab needed), NSGA-II front,
the student."""

import json

import pytest

from canao import hardware
from canao.cli.main import main
from canao.codesign.latency_model import LatencyModel
from canao.codesign.pareto import FRONT_JSON, FRONT_PNG, choose, dominated
from canao.hardware import Hardware
from canao.lm import generator
from canao.lm.latency import DECODER, FIRST_TOKEN, PER_TOKEN
from canao.lm.model import load_causal_lm
from canao.lm.search import GENERATION
from canao.lm.space import DecoderSubnet
from canao.manifest import verify_manifest


@pytest.fixture(scope="module")
def stages(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("search-lm")
    tiny = ["--profile", "tiny"]
    assert main(["lm-data", *tiny, "--out", str(root / "data")]) == 0
    assert main(["distill-lm", *tiny, "--teacher", str(tiny_lm), "--data", str(root / "data"),
                 "--out", str(root / "supernet")]) == 0
    assert main(["latency-lm", *tiny, "--set", f"compile.tuning_dir={root / 'tuning'}", "--teacher", str(tiny_lm),
                 "--device", "x86-1t", "--out", str(root / "latency")]) == 0
    assert main(["search-lm", *tiny, "--supernet", str(root / "supernet"), "--latency", str(root / "latency"),
                 "--out", str(root / "search")]) == 0
    assert main(["finalize-lm", *tiny, "--supernet", str(root / "supernet"), "--search", str(root / "search"),
                 "--out", str(root / "student")]) == 0
    return root


def test_decode_latency_model_round_trips_through_its_artifact(stages):
    manifest = verify_manifest(stages / "latency")
    model = LatencyModel.load(stages / "latency", DECODER)
    assert model.family.name == "decoder" and model.device == "x86-1t" and model.seq_len == 48
    assert len(model.measurements) == 4 and sum(m["heldout"] for m in model.measurements) == 1
    for key in (PER_TOKEN, FIRST_TOKEN):
        assert all(set(m[key]) == {"tvm", "llama.cpp"} and min(m[key].values()) > 0 for m in model.measurements)
    first_token = model.of(FIRST_TOKEN)
    assert first_token.seq_len == 44  # the prompt: the 48-token cache but the 4 tokens generated
    refit = LatencyModel.fit_family(model.device, {PER_TOKEN: model.seq_len, FIRST_TOKEN: first_token.seq_len},
                                    model.teacher, model.measurements, model.family)
    assert refit.coefficients == model.coefficients and refit.error == model.error
    assert refit.of(FIRST_TOKEN).coefficients == first_token.coefficients
    subnet = DecoderSubnet.from_dict(model.measurements[0]["subnet"])
    assert model.fastest(subnet) == min((model.predict(subnet, b), b) for b in ("tvm", "llama.cpp"))
    for error in ("error", f"{FIRST_TOKEN}_error"):
        assert set(manifest["metrics"][error]["llama.cpp"]) == {"model", "flops_proxy", "fitted_on", "heldout"}


def test_generation_search_returns_a_non_dominated_front(stages):
    result = json.loads((stages / "search" / FRONT_JSON).read_text())
    front = result["front"]
    assert front and dominated(front, GENERATION) == []
    for t in result["trials"]:  # no evaluated subnet beats a front point on both objectives
        for p in front:
            assert not (t["perplexity"] < p["perplexity"] and t["predicted_ms"] < p["predicted_ms"])
    assert result["objective"] == "ms_per_token" and result["prompt_tokens"] == 44
    for p in front:
        assert set(p) >= {"subnet", "perplexity", "top1_agreement", "predicted_ms", "measured_ms", "params", "flops"}
        assert DecoderSubnet.from_dict(p["subnet"]) and p["perplexity"] > 1 and p["flops"] > 0
        assert 0 <= p["top1_agreement"] <= 1
        # the objective's prediction, and both latencies on the same backend
        assert p["predicted_ms"] == p["predicted_ms_per_token"] and p["predicted_time_to_first_token_ms"] > 0
    measured = [p for p in front if p["measured_ms"] is not None]
    assert len(measured) == 1 and measured[0]["perplexity"] == min(p["perplexity"] for p in front)
    assert measured[0]["measured_ms"] == measured[0]["measured_ms_per_token"]
    assert measured[0]["measured_time_to_first_token_ms"] > 0
    assert all(p["measured_time_to_first_token_ms"] is None for p in front if p["measured_ms"] is None)
    teacher = result["teacher"]
    assert teacher["subnet"] == {"num_layers": 2, "kv_heads": 2, "ffn_size": 128}
    assert teacher["teacher_perplexity"] > 1 and 0 <= teacher["top1_agreement"] <= 1
    assert set(result["teacher"]["measured_ms_by_backend"]) == {"tvm", "llama.cpp"}
    assert teacher["measured_ms_by_backend"] == teacher["measured_ms_per_token_by_backend"]
    assert set(teacher["measured_time_to_first_token_ms_by_backend"]) == {"tvm", "llama.cpp"}
    assert (stages / "search" / FRONT_PNG).read_bytes()[:4] == b"\x89PNG"
    assert verify_manifest(stages / "search")["stage"] == "search-lm"


def test_search_lm_names_a_wrong_input(stages, tmp_path, capsys):
    code = main(["search-lm", "--profile", "tiny", "--supernet", str(stages / "supernet"),
                 "--latency", str(stages / "supernet"), "--out", str(tmp_path / "s")])
    assert code == 2 and "a 'distill-lm' artifact, not a latency model" in capsys.readouterr().err
    code = main(["search-lm", "--profile", "tiny", "--supernet", str(stages / "latency"),
                 "--latency", str(stages / "latency"), "--out", str(tmp_path / "s")])
    assert code == 2 and "not a decoder supernet (distill-lm)" in capsys.readouterr().err


def test_a_latency_model_from_other_hardware_is_refused_naming_both(stages, tmp_path, monkeypatch, capsys):
    """The latency model was measured on this machine; the search now runs where x86-1t is a Zen 3."""
    made_on = Hardware.from_dict(LatencyModel.load(stages / "latency", DECODER).hardware)
    zen3 = Hardware(cpu="AMD EPYC 7B13, family 25 model 1", arch="x86_64", isa=("avx2", "fma"), cores=1,
                    mcpu="znver3")
    monkeypatch.setattr(hardware, "host", lambda cores=None: zen3)
    code = main(["search-lm", "--profile", "tiny", "--supernet", str(stages / "supernet"),
                 "--latency", str(stages / "latency"), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and f"latency model: made on {made_on.label()}, not on this device's {zen3.label()}" in err
    assert "reuse_other_hardware=true" in err and not (tmp_path / "s").exists()


def test_finalize_lm_writes_the_chosen_student_fine_tuned(stages, capsys):
    manifest = verify_manifest(stages / "student")
    m = manifest["metrics"]
    chosen = choose(json.loads((stages / "search" / FRONT_JSON).read_text()), GENERATION)
    assert m["subnet"] == chosen["subnet"] == manifest["config"]["subnet"] and m["steps"] == 4
    assert m["search_objective"] == "ms_per_token" and m["predicted_ms_per_token"] == chosen["predicted_ms"]
    assert m["predicted_time_to_first_token_ms"] == chosen["predicted_time_to_first_token_ms"]
    assert m["perplexity"] > 1 and m["teacher_perplexity"] > 1 and 0 <= m["top1_agreement"] <= 1
    assert 0 <= m["greedy_agreement"] <= 1 and m["agreement_prompts"] == 4
    assert m["perplexity_vs_teacher"] == pytest.approx(m["perplexity"] / m["teacher_perplexity"], rel=1e-3)
    student = load_causal_lm(stages / "student")
    assert student.config.num_hidden_layers == chosen["subnet"]["num_layers"]
    assert sum(p.numel() for p in student.parameters()) == m["parameters"] == chosen["params"]
    decoder = generator.TorchDecoder(stages / "student", max_context=16)
    assert len([t for t, _ in generator.stream(decoder, [5, 6, 7], 4, stop_at_eos=False)]) == 4
    assert not (stages / "student" / "checkpoints").exists()
    assert "model.gguf" in manifest["files"]  # what llama.cpp runs, at the teacher file's precision
    # ...scored in llama.cpp itself: its quantized weights move the perplexity, not its scale
    assert m["gguf_perplexity"] == pytest.approx(m["perplexity"], rel=0.5)
    args = ["finalize-lm", "--profile", "tiny", "--supernet", str(stages / "supernet"), "--search"]
    assert main([*args, str(stages / "search"), "--out", str(stages / "student")]) == 0
    assert "already made; reusing it" in capsys.readouterr().out
    assert main([*args, str(stages / "search"), "--set", "seed=1", "--out", str(stages / "student")]) == 2
    assert "holds a student made with another config" in capsys.readouterr().err
    assert main([*args, str(stages / "latency"), "--out", str(stages / "other")]) == 2
    assert "not a generation search (search-lm)" in capsys.readouterr().err
