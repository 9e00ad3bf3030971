"""The decoder's two latency models (ms per generated token, time to first token) fitted on
synthetic measurements, and the generation search's objective: which of them it prices and
budgets. Seconds, no compiling: the measurements follow a known cost per op class."""

import dataclasses
import json

import optuna
import pytest

from canao.codesign.latency_model import MODEL_FILE, LatencyModel, measure_and_fit, sample_subnets
from canao.codesign.pareto import pareto_search
from canao.config import ConfigError
from canao.lab.devices import get_device
from canao.lm.config import LM_OBJECTIVES, DecoderShape, DecoderSpaceConfig, LMSearchConfig
from canao.lm.latency import DECODER, FIRST_TOKEN, PER_TOKEN
from canao.lm.search import OBJECTIVES, search_objective
from canao.lm.space import DecoderSpace, DecoderSubnet, decoder_work, prefill_work
from canao.profiles import load_config

TEACHER = DecoderShape(num_layers=8, hidden_size=256, num_heads=8, num_kv_heads=4, ffn_size=1024)
SPACE = DecoderSpace(DecoderSpaceConfig(layer_counts=(2, 4, 6, 8), kv_head_counts=(1, 2, 4),
                                        ffn_sizes=(256, 512, 768, 1024), align=32, depth="spread"), TEACHER)
CONTEXT, PROMPT = 640, 608  # the KV cache's length; the timed prompt fills it but 32 generated tokens
SEQ_LENS = {PER_TOKEN: CONTEXT, FIRST_TOKEN: PROMPT}
# ms of: overhead, a dense GFLOP, an attention GFLOP, a M elements; per backend, for each latency
COSTS = {PER_TOKEN: {"tvm": (0.2, 3.0, 9.0, 0.5), "llama.cpp": (0.1, 2.0, 4.0, 0.8)},
         FIRST_TOKEN: {"tvm": (2.0, 1.0, 6.0, 0.4), "llama.cpp": (1.5, 1.2, 2.0, 0.6)}}


def timed(subnet: DecoderSubnet) -> dict[str, dict[str, float]]:
    """Both latencies of `subnet` by backend, as the decoder's measure_one gives them."""
    timings = {}
    for key, work in ((PER_TOKEN, decoder_work), (FIRST_TOKEN, prefill_work)):
        w = work(subnet, TEACHER, SEQ_LENS[key])
        x = (1.0, w["dense"] / 1e9, w["attention"] / 1e9, w["elementwise"] / 1e6)
        timings[key] = {b: sum(c * v for c, v in zip(cost, x, strict=True)) for b, cost in COSTS[key].items()}
    return timings


def synthetic_measurements(n: int, heldout: int) -> list[dict]:
    return [{"subnet": s.to_dict(), **timed(s), "heldout": i >= n - heldout}
            for i, s in enumerate(sample_subnets(SPACE, n, seed=0))]


def test_a_prompts_prefill_grows_with_its_length_and_outweighs_a_decode_step():
    subnet = DecoderSubnet(4, 2, 512)
    one, short, long = (prefill_work(subnet, TEACHER, p) for p in (1, 64, PROMPT))
    assert one["dense"] == decoder_work(subnet, TEACHER, CONTEXT)["dense"]  # one token's projections and FFN
    assert long["dense"] == PROMPT * one["dense"] and short["dense"] == 64 * one["dense"]
    # a causal prompt: each token attends over itself and those before it
    assert long["attention"] == one["attention"] * PROMPT * (PROMPT + 1) // 2
    assert all(one[k] < short[k] < long[k] for k in one)
    step = decoder_work(subnet, TEACHER, CONTEXT)
    assert all(long[k] > step[k] for k in step)


def test_the_decoder_latency_model_predicts_both_latencies_and_round_trips(tmp_path):
    measurements = synthetic_measurements(14, 4)
    model = LatencyModel.fit_family("x86-1t", SEQ_LENS, TEACHER, measurements, DECODER)
    assert (model.metric, list(model.others)) == (PER_TOKEN, [FIRST_TOKEN])
    assert model.of(PER_TOKEN) is model and model.of(FIRST_TOKEN).seq_len == PROMPT
    for m in measurements:
        subnet = DecoderSubnet.from_dict(m["subnet"])
        for key in (PER_TOKEN, FIRST_TOKEN):
            for backend, ms in m[key].items():
                assert model.of(key).predict(subnet, backend) == pytest.approx(ms, rel=1e-3)
    teacher = SPACE.largest()
    assert model.of(FIRST_TOKEN).measured(teacher) == timed(teacher)[FIRST_TOKEN]
    assert model.of(FIRST_TOKEN).fastest(teacher)[0] > 10 * model.fastest(teacher)[0]
    for key in (PER_TOKEN, FIRST_TOKEN):
        for error in model.of(key).error.values():
            assert error["model"]["mape_pct"] < 0.5 and error["flops_proxy"]["mape_pct"] > error["model"]["mape_pct"]
    model.save(tmp_path)
    assert LatencyModel.load(tmp_path, DECODER) == model
    with pytest.raises(ValueError, match="'ttft': the latency model predicts ms, time_to_first_token_ms"):
        model.of("ttft")
    # a decoder model from before the time to first token was timed: refused, saying what to do
    data = json.loads((tmp_path / MODEL_FILE).read_text())
    del data["metric"], data["others"]
    (tmp_path / MODEL_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="without time_to_first_token_ms .* run the latency stage again"):
        LatencyModel.load(tmp_path, DECODER)


def test_the_latency_stage_writes_both_models_and_each_ones_error(tmp_path):
    subnets = sample_subnets(SPACE, 6, seed=0)
    manifest = measure_and_fit(tmp_path, "fingerprint", get_device("x86-1t"), SEQ_LENS, TEACHER, DECODER, subnets,
                               2, lambda subnet, work_dir: timed(subnet), {}, {}, reuse_other_hardware=False)
    errors = manifest["metrics"]
    for key in ("error", f"{FIRST_TOKEN}_error"):
        assert set(errors[key]) == {"tvm", "llama.cpp"}
        assert set(errors[key]["tvm"]) == {"model", "flops_proxy", "fitted_on", "heldout"}
    model = LatencyModel.load(tmp_path, DECODER)
    assert errors[f"{FIRST_TOKEN}_error"] == model.of(FIRST_TOKEN).error and errors["error"] == model.error
    assert [m[FIRST_TOKEN] for m in model.measurements] == [timed(s)[FIRST_TOKEN] for s in subnets]


def test_the_objective_picks_the_latency_the_search_prices_and_budgets():
    model = LatencyModel.fit_family("x86-1t", SEQ_LENS, TEACHER, synthetic_measurements(14, 4), DECODER)
    teacher = SPACE.largest()
    assert set(OBJECTIVES) == set(LM_OBJECTIVES)
    assert LMSearchConfig().objective == "ms_per_token"
    c = SPACE.cfg

    def suggest(trial: optuna.Trial) -> DecoderSubnet:
        return SPACE.make(trial.suggest_categorical("num_layers", c.layer_counts),
                          trial.suggest_categorical("kv_heads", c.kv_head_counts),
                          trial.suggest_categorical("ffn_size", c.ffn_sizes))

    def score(subnet: DecoderSubnet) -> dict:  # a deeper, wider subnet scores better
        return {"perplexity": 10.0 + 1e4 / (subnet.num_layers * subnet.ffn_size)}

    for objective, key in (("ms_per_token", PER_TOKEN), ("time_to_first_token", FIRST_TOKEN)):
        cfg = LMSearchConfig(objective=objective, min_speedup=2, trials=8, population_size=4)
        objectives, teacher_ms, budget = search_objective(cfg, model, teacher)
        assert objectives.latency == key and teacher_ms == timed(teacher)[key]
        assert budget == timed(teacher)[key]["llama.cpp"] / 2
        study = pareto_search(dataclasses.replace(cfg, latency_budget_ms=budget), objectives, suggest, score, model,
                              lambda s: 0, lambda s: 0, [], None)
        for t in study.trials:
            predicted_ms, backend = model.of(key).fastest(DecoderSubnet.from_dict(t.user_attrs["subnet"]))
            assert t.values[1] == predicted_ms and t.user_attrs["backend"] == backend
            assert t.constraints["ms_over_budget"] == pytest.approx(predicted_ms - budget)


def test_a_bad_objective_is_named():
    with pytest.raises(ConfigError, match="objective: 'latency' is not one of ms_per_token, time_to_first_token"):
        LMSearchConfig(objective="latency")
    with pytest.raises(ConfigError, match="search-lm.yaml: objective: 'ttft' is not one of"):
        load_config("search-lm", "tiny", overrides=["objective=ttft"])
    assert load_config("search-lm", "tiny", overrides=["objective=time_to_first_token"]).objective == \
        "time_to_first_token"
