"""Text generation on a tiny random decoder: the KV-cache step, TVM-compiled decoding against
PyTorch, sampling, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from canao import config
from canao.bench import suite as bench_suite
from canao.bench.suite import suite, suite_lm_inputs
from canao.cli.main import main
from canao.config import ConfigError
from canao.lab import devices
from canao.lab.devices import get_device
from canao.lm import generator
from canao.lm.bench import GenRecord, bench_generation, generation_table
from canao.lm.config import GEN_BACKENDS
from canao.lm.model import KVCacheStep, load_causal_lm
from canao.profiles import load_config


@pytest.fixture(scope="module")
def litert_root(tmp_path_factory, litert_env):
    """One directory of LiteRT conversions for the module: each decoder is converted once."""
    return tmp_path_factory.mktemp("litert-lm")


def _prompt(n, seed=0):
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_kv_cache_decoding_equals_full_recomputation(tiny_lm):
    model = load_causal_lm(tiny_lm)
    step = KVCacheStep(model, max_context=32).eval()
    ids = torch.tensor([_prompt(20)])
    with torch.no_grad():
        full = model(input_ids=ids).logits[0]  # [20, V]: every position recomputed from scratch
        keys, values = step.empty_cache()
        logits, keys, values = step(ids[:, :7], torch.tensor([0]), torch.tensor([6]), keys, values)  # a prefill chunk
        torch.testing.assert_close(logits[0], full[6], atol=1e-5, rtol=0)
        for t in range(7, 20):
            logits, keys, values = step(ids[:, t : t + 1], torch.tensor([t]), torch.tensor([0]), keys, values)
            torch.testing.assert_close(logits[0], full[t], atol=1e-5, rtol=0)


def test_compiled_steps_match_pytorch(compiled_lm):
    out, manifest = compiled_lm
    assert set(manifest["backends"]) == {"prefill", "decode"}
    assert all(diff <= 1e-3 for diff in manifest["metrics"]["numerics_max_abs_diff"].values())
    assert manifest["config"]["target"]["kind"] == "llvm"
    assert manifest["eos_token_ids"] == [2]
    for path in manifest["backends"].values():
        assert (out / path).is_file()


def test_compiled_greedy_output_equals_pytorch(tiny_lm, compiled_lm):
    # 20 prompt tokens: a full prefill chunk (16) and a padded one, then decode steps.
    prompt, new = _prompt(20, seed=1), 12
    model = load_causal_lm(tiny_lm)
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                   pad_token_id=2)[0, len(prompt) :].tolist()
    tvm = generator.TVMDecoder(compiled_lm[0])
    tvm_tokens = [t for t, _ in generator.stream(tvm, prompt, new, stop_at_eos=False)]
    torch_tokens = [t for t, _ in generator.stream(generator.TorchDecoder(tiny_lm, 48), prompt, new, stop_at_eos=False)]
    assert tvm_tokens == reference
    assert torch_tokens == reference


def test_litert_steps_greedy_output_equals_pytorch(tiny_lm, litert_root):
    # The same KV-cache step converted to LiteRT: 20 prompt tokens (a full and a padded prefill chunk).
    prompt, new = _prompt(20, seed=1), 12
    steps = generator.litert_steps(tiny_lm, load_config("compile-lm", "tiny"), litert_root)
    assert generator.litert_steps(tiny_lm, load_config("compile-lm", "tiny"), litert_root) == steps  # reused
    decoder = generator.open_decoder(steps)
    assert isinstance(decoder, generator.LiteRTDecoder) and decoder.eos_token_ids == (2,)
    litert_tokens = [t for t, _ in generator.stream(decoder, prompt, new, stop_at_eos=False)]
    torch_tokens = [t for t, _ in generator.stream(generator.TorchDecoder(tiny_lm, 48), prompt, new, stop_at_eos=False)]
    assert litert_tokens == torch_tokens
    keys, values = decoder.empty_cache()
    logits, _, _ = decoder(np.array([prompt[:1]]), 0, 0, keys, values)
    with torch.no_grad():
        reference = load_causal_lm(tiny_lm)(input_ids=torch.tensor([prompt[:1]])).logits[0, 0].numpy()
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=0)


def test_stream_stops_at_eos_or_max_tokens(compiled_lm):
    decoder = generator.TVMDecoder(compiled_lm[0])
    greedy = [t for t, _ in generator.stream(decoder, _prompt(5), 6, stop_at_eos=False)]
    assert len(greedy) == 6
    decoder.eos_token_ids = (greedy[2],)  # pretend the third token ends the text
    assert [t for t, _ in generator.stream(decoder, _prompt(5), 6)] == greedy[: greedy.index(greedy[2]) + 1]


def test_sampling():
    logits = np.array([0.0, 3.0, 2.9, -1.0, 1.0], np.float32)
    rng = np.random.default_rng(0)
    assert generator.sample(logits, generator.Sampling(), rng) == 1
    assert generator.sample(logits, generator.Sampling(temperature=1.0, top_k=1), rng) == 1
    assert generator.sample(logits, generator.Sampling(temperature=1.0, top_p=0.01), rng) == 1
    assert generator.sample(logits, generator.Sampling(temperature=5e-324), rng) == 1  # no overflow to NaN
    top2 = {generator.sample(logits, generator.Sampling(temperature=5.0, top_k=2), rng) for _ in range(200)}
    assert top2 == {1, 2}
    # probabilities 0.474, 0.429, 0.064, 0.024, 0.009: the first three reach 0.95, the rest are never drawn
    nucleus = {generator.sample(logits, generator.Sampling(temperature=1.0, top_p=0.95), rng) for _ in range(300)}
    assert nucleus == {1, 2, 4}
    seeded = [generator.sample(logits, generator.Sampling(temperature=1.0), np.random.default_rng(7)) for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize(("kwargs", "field"), [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
                                               ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_invalid_sampling_parameters_name_the_parameter(kwargs, field):
    with pytest.raises(ValueError, match=field):
        generator.Sampling(**kwargs)


def test_prompt_fitting(compiled_lm):
    decoder = generator.TVMDecoder(compiled_lm[0])  # context window 48
    with pytest.raises(ValueError, match="prompt: empty"):
        generator.fit_prompt([], 4, decoder)
    for bad in (0, 48):
        with pytest.raises(ValueError, match=r"max_new_tokens: must be in \[1, 47\]"):
            generator.fit_prompt([5, 6], bad, decoder)
    ids = list(range(100, 160))
    kept, dropped = generator.fit_prompt(ids, 8, decoder)
    assert kept == ids[-40:] and dropped == 20  # truncated from the left
    assert generator.fit_prompt(ids[:10], 8, decoder) == (ids[:10], 0)
    with pytest.raises(ValueError, match="fit_prompt"):
        list(generator.stream(decoder, ids, 8))


def _cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_cli_streams_and_reports_timings(compiled_lm, capsys):
    long_prompt = "word " * 100  # more tokens than the 48-token window
    code, out, err = _cli(capsys, "generate", "--model", str(compiled_lm[0]), "--prompt", long_prompt,
                          "--max-new-tokens", "5", "--no-chat")
    assert code == 0
    assert "prompt truncated from the left: kept its last 43 tokens" in err
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["backend"] == "tvm" and stats["new_tokens"] == 5 and stats["prompt_tokens"] == 43
    assert stats["time_to_first_token_ms"] > 0 and stats["ms_per_token"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt", "  "], "prompt: empty"),
    (["--prompt", "hi", "--max-new-tokens", "1000"], "max_new_tokens: must be in"),
    (["--prompt", "hi", "--top-p", "2"], "top_p"),
])
def test_generate_cli_bad_input(compiled_lm, capsys, args, message):
    code, _, err = _cli(capsys, "generate", "--model", str(compiled_lm[0]), *args)
    assert code == 2
    assert err.startswith("canao generate: error:") and message in err


def test_compile_lm_config_is_checked():
    for bad in (100, 20):  # longer than the cache; not dividing it
        with pytest.raises(ConfigError, match="prefill_len: must divide max_context"):
            load_config("compile-lm", "tiny", overrides=[f"prefill_len={bad}"])


def test_generation_benchmark_runs_every_backend(tiny_lm, compiled_lm, litert_root):

    cfg = load_config("bench-lm", "tiny")
    records = bench_generation(tiny_lm, compiled_lm[0], get_device("x86-1t"), GEN_BACKENDS, cfg,
                                     load_config("compile-lm", "tiny"), litert_root)
    assert [(r.backend, r.context) for r in records] == [(b, 16) for b in GEN_BACKENDS]
    assert all(r.ms_per_token > 0 and r.time_to_first_token_ms > 0 and r.new_tokens == 4 for r in records)
    assert records[2].model.endswith(".gguf")  # llama.cpp runs the teacher's own file
    assert Path(records[3].model).parent == litert_root and records[3].version.startswith("litert")
    assert "| x86-1t | 16 | tvm |" in generation_table(records)


def test_generation_benchmark_bad_input(tiny_lm, compiled_lm):

    too_long = load_config("bench-lm", "tiny", overrides=["contexts=[100]"])
    with pytest.raises(ValueError, match="KV cache holds 48 tokens"):
        bench_generation(tiny_lm, compiled_lm[0], get_device("x86-1t"), ("tvm",), too_long)
    with pytest.raises(ValueError, match="--backends: unknown onnx"):
        bench_generation(tiny_lm, compiled_lm[0], get_device("x86-1t"), ("onnx",), load_config("bench-lm", "tiny"))
    with pytest.raises(ValueError, match="--artifact"):
        bench_generation(tiny_lm, None, get_device("x86-1t"), ("tvm",), load_config("bench-lm", "tiny"))


def test_generation_suite_times_teacher_peers_and_student(tmp_path, monkeypatch, litert_root):
    from canao.codesign.elastic import extract
    from canao.lm.gguf import GGUF_FILE, export_gguf
    from canao.lm.model import DecoderSupernet, load_tokenizer
    from canao.lm.space import DecoderSubnet

    monkeypatch.setattr(bench_suite, "BENCH_MODELS_DIR", str(tmp_path / "bench-models"))
    teacher, heldout = suite_lm_inputs(tmp_path / "absent", tmp_path / "absent", "tiny")  # made, tiny profile
    assert teacher == tmp_path / "bench-models" / "lm-teacher-tiny" and heldout.name == "heldout.txt"
    assert suite_lm_inputs(teacher, heldout.parent, "tiny") == (teacher, heldout)  # given ones are used
    student = tmp_path / "student"
    extract(DecoderSupernet(load_causal_lm(teacher)), DecoderSubnet(1, 1, 64)).save_pretrained(student)
    load_tokenizer(teacher).save_pretrained(student)
    export_gguf(student, student / GGUF_FILE)
    monkeypatch.setenv("CANAO_DEVICES", str(devices.devices_file(devices.DEVICES_FILE)))
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path)  # compiled artifacts and tuning records land here
    monkeypatch.setattr(generator, "LITERT_STEPS_DIR", str(litert_root))  # the tiny teacher converted once
    # `make bench-lm`: the generation section and records are replaced, the rest of the report kept.
    out = tmp_path / "BENCHMARKS.md"
    qa = {"backend": "litert", "p50_ms": 1.0}
    out.write_text("# Benchmarks\n\n### QA teacher\n\nkept\n\n## Text generation\n\nold\n\n"
                   "## Serving load test\n\nkept too\n")
    out.with_suffix(".json").write_text(json.dumps({"records": [qa, {"backend": "tvm", "ms_per_token": 9.0}]}))
    suite(tmp_path / "no-qa-teacher", "tiny", out, "canao bench-suite --generation-only", teacher,
                heldout.parent, student, generation_only=True)
    markdown = out.read_text()
    assert "old" not in markdown and markdown.count("kept") == 2 and markdown.index("### QA teacher") < \
        markdown.index("## Text generation") < markdown.index("### Generation: student") < \
        markdown.index("## Serving load test")
    assert "Generated by `canao bench-suite --generation-only` on" in markdown
    saved = json.loads(out.with_suffix(".json").read_text())["records"]
    assert saved[0] == qa
    records = [GenRecord(**{**r, "cores": tuple(r["cores"])}) for r in saved[1:]]
    assert [r.backend for r in records] == list(GEN_BACKENDS) * 2
    compiled_root = tmp_path / "outputs" / "compiled" / "x86-1t"
    assert Path(records[0].model).parent == compiled_root and records[1].model == str(teacher)
    assert records[2].model.endswith(".gguf") and records[5].model == str(student)
    assert records[6].model == str(student / GGUF_FILE)  # the student's own export, not the teacher's file
    assert Path(records[3].model).parent == Path(records[7].model).parent == litert_root
    assert "### Generation: teacher" in markdown and "### Generation: student" in markdown
    assert markdown.count("| x86-1t | 16 | llama.cpp |") == 2  # the teacher's file; the student's export
    assert markdown.count("| x86-1t | 16 | llama.cpp, teacher GGUF |") == 1  # the student's table keeps the peer
    assert "| teacher |" in markdown and "| student |" in markdown and "| 63 |" in markdown  # 64 tokens, 63 scored
