"""Configs of the CANAO stages, the latency model's fit and artifact, front selection."""

import json

import optuna
import pytest

from canao.codesign.latency_model import MODEL_FILE, LatencyModel, sample_subnets
from canao.codesign.pareto import (
    RERANKED,
    Climb,
    Objectives,
    choose,
    dominated,
    front_budgets,
    latency_budget,
    pareto_search,
    remeasure,
    rerank,
    search_budget,
)
from canao.config import PROFILES, ConfigError
from canao.lm.config import LMSearchConfig
from canao.lm.search import GENERATION
from canao.profiles import load_config
from canao.qa.config import BertShape, SearchConfig, SpaceConfig
from canao.qa.finalize import finalized_figures, kept_blocks, plan
from canao.qa.latency import BERT_QA, features
from canao.qa.search import QA
from canao.qa.space import SearchSpace, SubnetConfig

MINILM = BertShape(6, 384, 12, 1536)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("stage", ["distill", "latency", "search", "finalize"])
def test_every_profile_has_a_valid_config(stage, profile):
    cfg = load_config(stage, profile)
    if stage in ("distill", "latency") and profile != "tiny":
        SearchSpace(cfg.space, MINILM)  # the quick and full spaces fit the MiniLM teacher


def test_configs_name_bad_values():
    with pytest.raises(ConfigError, match=r"backends: \['tflite'\]: every backend must be tvm or one of"):
        load_config("latency", "tiny", overrides=["backends=[tvm, tflite]"])
    with pytest.raises(ConfigError, match="samples/holdout"):
        load_config("latency", "tiny", overrides=["holdout=3"])
    with pytest.raises(ConfigError, match="kd.temperature: must be > 0"):
        load_config("distill", "tiny", overrides=["kd.temperature=0"])
    with pytest.raises(ConfigError, match="space.widths: unknown key"):
        load_config("distill", "tiny", overrides=["space.widths=[1]"])


def synthetic_measurements(n: int, heldout: int) -> list[dict]:
    """Latencies that follow a known op-class cost (ms per dense GFLOP, attention GFLOP, M elements)."""
    space = SearchSpace(SpaceConfig(), MINILM)
    rows = []
    for i, subnet in enumerate(sample_subnets(space, n, seed=0)):
        x = features(subnet, MINILM, 384)
        tvm = 0.3 + x[1] * 2e-9 + x[2] * 6e-9 + x[3] * 5e-7
        litert = 0.1 + x[1] * 2.5e-9 + x[2] * 3e-9 + x[3] * 2e-7
        rows.append({"subnet": subnet.to_dict(), "ms": {"tvm": tvm, "litert": litert}, "heldout": i >= n - heldout})
    return rows


def test_latency_model_fits_round_trips_and_beats_the_flops_proxy(tmp_path):
    model = LatencyModel.fit("x86-1t", 384, MINILM, synthetic_measurements(16, 5), BERT_QA)
    model.save(tmp_path)
    loaded = LatencyModel.load(tmp_path, BERT_QA)
    assert loaded == model
    for m in model.measurements:
        subnet = SubnetConfig.from_dict(m["subnet"])
        for backend, ms in m["ms"].items():
            assert loaded.predict(subnet, backend) == pytest.approx(ms, rel=1e-3)
    for backend in ("tvm", "litert"):
        error = model.error[backend]
        assert error["model"]["mape_pct"] < 0.5 and error["model"]["spearman"] == 1.0
        assert error["flops_proxy"]["mape_pct"] > error["model"]["mape_pct"]
    with pytest.raises(FileNotFoundError, match="no latency model"):
        LatencyModel.load(tmp_path / "missing", BERT_QA)
    # a file written before a family could time more than one latency reads as it did
    data = json.loads((tmp_path / MODEL_FILE).read_text())
    del data["metric"], data["others"]
    (tmp_path / MODEL_FILE).write_text(json.dumps(data))
    assert LatencyModel.load(tmp_path, BERT_QA) == model


def test_front_helpers():
    points = [{"f1": 50.0, "predicted_ms": 2.0, "measured_ms": 2.5}, {"f1": 60.0, "predicted_ms": 4.0,
                                                                      "measured_ms": None},
              {"f1": 55.0, "predicted_ms": 5.0, "measured_ms": None}]
    assert dominated(points, QA) == [points[2]]
    assert choose({"latency_budget_ms": 3.0, "front": points}, QA) == points[0]
    assert choose({"latency_budget_ms": 0.0, "front": points}, QA) == points[1]
    with pytest.raises(ValueError, match="no front point within the latency budget of 1.0 ms"):
        choose({"latency_budget_ms": 1.0, "front": points}, QA)
    assert choose({"latency_budget_ms": 3.0, "front": points}, QA, budget_ms=4.0) == points[1]


def test_remeasure_times_each_budgets_choice_until_the_choice_is_measured_and_fits():
    def point(f1, predicted_ms):
        return {"f1": f1, "subnet": {"id": f1}, "predicted_ms": predicted_ms, "measured_ms": None,
                "measured_backend": None, "measured_ms_by_backend": None}

    # The model underprices the two most accurate points under 10 ms: measured, they leave the budget.
    front = [point(40.0, 6.0), point(50.0, 8.0), point(55.0, 9.0), point(70.0, 15.0), point(75.0, 18.0)]
    true_ms = {40.0: 6.5, 50.0: 8.5, 55.0: 10.4, 70.0: 15.2, 75.0: 21.0}
    timed = []

    def measure_one(subnet):
        timed.append(subnet["id"])
        return {"litert": true_ms[subnet["id"]] * 2, "litert-int8": true_ms[subnet["id"]]}

    remeasure(front, QA, 1, measure_one, [10.0, 20.0])
    # the most accurate first; then 10 ms: 55 (over once measured), then 50 (fits); 20 ms: 70 fits
    assert timed == [75.0, 55.0, 50.0, 70.0]
    for budget, f1 in ((10.0, 50.0), (20.0, 70.0)):
        chosen = choose({"latency_budget_ms": budget, "front": front}, QA)
        assert chosen["f1"] == f1 and chosen["measured_ms"] <= budget and chosen["measured_backend"] == "litert-int8"


def test_rerank_scores_each_budgets_measured_contenders_and_choose_ships_by_that_score():
    def point(f1, predicted_ms):
        return {"f1": f1, "subnet": {"id": f1}, "label": f"L{f1:g}", "predicted_ms": predicted_ms,
                "measured_ms": None, "measured_backend": None, "measured_ms_by_backend": None}

    front = [point(30.0, 5.0), point(33.0, 8.0), point(36.0, 9.0), point(47.0, 9.2), point(60.0, 15.0),
             point(65.0, 17.0), point(70.0, 30.0)]
    true_ms = {30.0: 5.0, 33.0: 8.0, 36.0: 7.4, 47.0: 10.1, 60.0: 15.0, 65.0: 17.0, 70.0: 30.0}
    after_kd = {30.0: 40.0, 33.0: 48.0, 36.0: 31.0, 60.0: 66.0, 65.0: 64.0}  # the supernet misranks the small end
    budgets = [9.4, 18.8]
    with pytest.raises(ValueError, match="not measured"):
        rerank(front, QA, budgets, 2, lambda points: [after_kd[p["f1"]] for p in points])
    remeasure(front, QA, 0, lambda s: {"litert-int8": true_ms[s["id"]]}, budgets, per_budget=2)
    # 47 left the 9.4 ms budget once measured; the two most accurate within each budget are measured
    assert [p["f1"] for p in front if p["measured_ms"] is not None] == [33.0, 36.0, 47.0, 60.0, 65.0]
    scored = []

    def short_kd(points):
        scored.extend(p["f1"] for p in points)
        return [after_kd[p["f1"]] for p in points]

    rerank(front, QA, budgets, 2, short_kd)
    assert sorted(scored) == [33.0, 36.0, 60.0, 65.0]  # each contender once, whichever budgets it is in
    assert choose({"latency_budget_ms": 9.4, "front": front}, QA)["f1"] == 33.0
    assert choose({"latency_budget_ms": 18.8, "front": front}, QA)["f1"] == 60.0
    assert choose({"latency_budget_ms": 0.0, "front": front}, QA)[RERANKED] == 66.0  # scored points rank first
    # a budget none of whose points was re-ranked ships by the supernet's figure
    assert choose({"latency_budget_ms": 6.0, "front": front}, QA)["f1"] == 30.0


def test_latency_samples_start_with_the_spaces_extremes():
    space = SearchSpace(SpaceConfig(layer_counts=(3, 6), hidden_sizes=(384,), head_counts=(2, 12),
                                    ffn_sizes=(256, 1536)), MINILM)
    largest, smallest, deep_thin, shallow_wide, *random = sample_subnets(space, 6, seed=0)
    assert (largest, smallest) == (space.largest(), space.smallest())
    assert (deep_thin.num_layers, set(deep_thin.heads), set(deep_thin.ffn_sizes)) == (6, {2}, {256})
    assert (shallow_wide.num_layers, set(shallow_wide.heads), set(shallow_wide.ffn_sizes)) == (3, {12}, {1536})
    assert len(random) == 2 and len(set(random)) == 2 and not set(random) & set(space.extremes())


def test_the_deployed_budget_may_train_longer_than_the_looser_ones():
    cfg = load_config("finalize", "tiny", overrides=["deployed_epochs=3", "train.epochs=1"])
    assert (cfg.train_of(deployed=True).epochs, cfg.train_of(deployed=False).epochs) == (3, 1)
    assert load_config("finalize", "tiny", overrides=["train.epochs=2"]).train_of(deployed=True).epochs == 2
    with pytest.raises(ConfigError, match="deployed_epochs: must be >= 0"):
        load_config("finalize", "tiny", overrides=["deployed_epochs=-1"])


def test_looser_budgets_widen_the_search_and_each_gets_a_student_and_a_baseline():
    teacher_ms = {"litert": 96.0}
    cfg = SearchConfig(min_speedup=8, front_speedups=(2.0, 4.0))
    looser = front_budgets(cfg, teacher_ms, QA.baseline)
    assert looser == [{"min_speedup": 2.0, "latency_budget_ms": 48.0}, {"min_speedup": 4.0, "latency_budget_ms": 24.0}]
    assert search_budget(12.0, looser) == 48.0 and search_budget(0.0, looser) == 0.0  # none stays none
    with pytest.raises(ValueError, match="front_speedups: the latency model holds no litert timing"):
        front_budgets(cfg, {"tvm": 120.0}, QA.baseline)
    with pytest.raises(ConfigError, match=r"front_speedups: every speed-up must be > 0, got \[4.0, 0.0\]"):
        SearchConfig(front_speedups=(4.0, 0.0))

    def point(f1, ms, layers):
        return {"f1": f1, "predicted_ms": ms, "measured_ms": None, "subnet": {"num_layers": layers}}

    front = [point(40.0, 10.0, 3), point(55.0, 20.0, 4), point(65.0, 40.0, 6)]
    baselines = {ms: {"f1": 30.0, "predicted_ms": ms, "subnet": {"num_layers": 2}} for ms in (12.0, 24.0, 48.0)}
    result = {"latency_budget_ms": 12.0, "front": front, "baseline": baselines[12.0],
              "front_budgets": [{**b, "baseline": baselines[b["latency_budget_ms"]]} for b in looser]}
    models = plan(result, with_baseline=True)
    assert [(m.name, m.directory, m.origin, m.budget_ms) for m in models] == [
        ("student", "", front[0], 12.0), ("baseline", "baseline", baselines[12.0], 12.0),
        ("2x", "budgets/2x", front[2], 48.0), ("2x/baseline", "budgets/2x/baseline", baselines[48.0], 48.0),
        ("4x", "budgets/4x", front[1], 24.0), ("4x/baseline", "budgets/4x/baseline", baselines[24.0], 24.0)]
    assert [m.name for m in plan(result, with_baseline=False)] == ["student", "2x", "4x"]


def test_latency_budget_is_the_tighter_of_the_absolute_and_the_speedup_over_the_peer():
    teacher_ms = {"tvm": 120.0, "litert": 96.0}
    assert latency_budget(SearchConfig(), teacher_ms, QA.baseline) == 0.0
    assert latency_budget(SearchConfig(latency_budget_ms=20.0), teacher_ms, QA.baseline) == 20.0
    assert latency_budget(SearchConfig(min_speedup=8), teacher_ms, QA.baseline) == 12.0
    assert latency_budget(SearchConfig(latency_budget_ms=10.0, min_speedup=8), teacher_ms, QA.baseline) == 10.0
    with pytest.raises(ValueError, match="min_speedup: the latency model holds no litert timing"):
        latency_budget(SearchConfig(min_speedup=8), {"tvm": 120.0}, QA.baseline)
    # Generation's peer is llama.cpp on the teacher's shape.
    assert latency_budget(LMSearchConfig(min_speedup=4), {"llama.cpp": 10.0, "tvm": 80.0}, GENERATION.baseline) == 2.5
    with pytest.raises(ValueError, match="min_speedup: the latency model holds no llama.cpp timing"):
        latency_budget(LMSearchConfig(min_speedup=4), {"tvm": 80.0}, GENERATION.baseline)
    for bad in (SearchConfig, LMSearchConfig):
        with pytest.raises(ConfigError, match="min_speedup"):
            bad(min_speedup=-1)
    with pytest.raises(ConfigError, match="torch_device: must be one of cpu, cuda"):
        LMSearchConfig(torch_device="gpu")


def test_a_front_point_and_a_baseline_of_one_shape_are_one_subnet_to_finalize():
    point = SubnetConfig(4, 384, (2,) * 4, (1280,) * 4)  # the search's form: blocks by the space's rule
    baseline = SubnetConfig(4, 384, (2,) * 4, (1280,) * 4, (0, 1, 3, 4))  # the baseline's: blocks written out
    assert point != baseline and kept_blocks(point, 6) == kept_blocks(baseline, 6) == baseline


def test_finalized_figures_list_each_budgets_student_then_its_baseline_the_deployed_first():
    metrics = {"f1": 40.0, "student_ms": {"litert-int8": 9.0}, "student_best_backend": "litert-int8",
               "student_best_backend_f1": 39.5, "baseline": {"f1": 30.0},
               "budgets": {"4x": {"f1": 60.0, "baseline": {"f1": 50.0}}, "2x": {"f1": 65.0}}}
    models = finalized_figures(metrics)
    assert [(b, d) for b, d, _ in models] == [("deployed", "."), ("deployed", "./baseline"), ("4x", "budgets/4x"),
                                             ("4x", "budgets/4x/baseline"), ("2x", "budgets/2x")]
    deployed = models[0][2]
    assert (deployed["ms"], deployed["best_backend_f1"], deployed["f1"]) == ({"litert-int8": 9.0}, 39.5, 40.0)
    assert [f["f1"] for _, _, f in models[1:]] == [30.0, 60.0, 50.0, 65.0]


def test_the_pipeline_searches_under_the_tightest_budget_given_or_else_the_profiles_own():
    from components.runtime import with_latency_budget

    assert with_latency_budget({"search": ["trials=2"]}, [25.0, 10.0]) == {
        "search": ["trials=2", "latency_budget_ms=10.0"]}
    assert with_latency_budget({"compile": ["trials=0"]}, []) == {"compile": ["trials=0"]}
    assert load_config("search", "quick").latency_budget_ms == 10.0  # `make run`'s budget
    with pytest.raises(ValueError, match=r"latency_budgets_ms: expected a list of positive numbers, got \[10.0, -1\]"):
        with_latency_budget({}, [10.0, -1])


def test_the_climb_steps_from_each_budgets_best_point_to_a_better_neighbour_within_the_budget():
    model = LatencyModel.fit("x86-1t", 384, MINILM, synthetic_measurements(16, 5), BERT_QA)
    space = SearchSpace(SpaceConfig(layer_counts=(2, 6), hidden_sizes=(384,), head_counts=(2, 6, 12),
                                    ffn_sizes=(256, 768, 1536)), MINILM)

    def suggest(trial: optuna.Trial) -> SubnetConfig:
        return space.make(trial.suggest_categorical("num_layers", (2, 6)), 384,
                          [trial.suggest_categorical(f"heads_{i}", (2, 6, 12)) for i in range(6)],
                          [trial.suggest_categorical(f"ffn_{i}", (256, 768, 1536)) for i in range(6)])

    def params(subnet: SubnetConfig) -> dict:
        pad = 6 - subnet.num_layers
        return {"num_layers": subnet.num_layers, **{f"heads_{i}": h for i, h in enumerate(subnet.heads + (2,) * pad)},
                **{f"ffn_{i}": f for i, f in enumerate(subnet.ffn_sizes + (256,) * pad)}}

    def score(subnet: SubnetConfig) -> dict:  # the first layer's FFN matters most
        return {"f1": subnet.num_layers + subnet.ffn_sizes[0] / 100 + sum(subnet.ffn_sizes[1:]) / 1e3
                + sum(subnet.heads) / 1e4}

    smallest = space.make(6, 384, [2] * 6, [256] * 6)
    budgets = (model.fastest(smallest)[0] * 1.15, model.fastest(space.largest())[0] * 0.8)
    cfg = SearchConfig(trials=1, population_size=2, latency_budget_ms=max(budgets))
    objectives = Objectives("f1", True, "", "", "litert")
    climb = Climb(budgets, 30, 2, space.larger_neighbours, SubnetConfig.from_dict, params)
    study = pareto_search(cfg, objectives, suggest, score, model, lambda s: 0, lambda s: 0, [params(smallest)], None,
                          climb)
    evaluated = [SubnetConfig.from_dict(t.user_attrs["subnet"]) for t in study.trials]
    assert evaluated[0] == smallest and len(evaluated) == len(set(evaluated)) <= 31
    for budget in budgets:
        within = [s for s in evaluated if model.fastest(s)[0] <= budget]
        best = max(within, key=lambda s: score(s)["f1"])
        assert score(best)["f1"] > score(smallest)["f1"]
        # the climb ended at a local optimum: every neighbour within the budget was evaluated
        if len(evaluated) < 31:
            assert all(n in evaluated for n in space.larger_neighbours(best) if model.fastest(n)[0] <= budget)
    with pytest.raises(ConfigError, match="climb_trials: must be >= 0, climb_per_round: >= 1"):
        load_config("search", "tiny", overrides=["climb_per_round=0"])
