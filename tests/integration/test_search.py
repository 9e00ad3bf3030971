"""The CANAO stages end to end on the tiny profile: supernet, latency model on a real device
lab, NSGA-II search, finalize."""

import json
import statistics

import pytest
import yaml
from scipy.stats import spearmanr

from canao.bench.suite import PROXY_SECTION, SEARCH_SECTION, STUDENTS_SECTION, markdown_section
from canao.cli.main import main
from canao.codesign.latency_model import LatencyModel
from canao.codesign.pareto import FRONT_JSON, FRONT_PNG, RERANKED, choose, contenders, dominated, point_ms
from canao.lab import devices
from canao.lab.devices import get_device
from canao.manifest import verify_manifest
from canao.profiles import load_config
from canao.qa.data import SquadExample
from canao.qa.distill import train_supernet
from canao.qa.finalize import BASELINE_DIR, finalize, finalized_figures
from canao.qa.latency import BERT_QA, fit_latency_model
from canao.qa.predictor import QAPredictor
from canao.qa.search import QA, search
from canao.qa.space import SubnetConfig
from canao.qa.teacher import train_teacher
from tests.integration.conftest import running_lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    project = yaml.safe_load(devices.devices_file(devices.DEVICES_FILE).read_text())
    with running_lab(tmp_path_factory.mktemp("lab"), {"x86-1t": project["x86-1t"]}) as state:
        yield state


@pytest.fixture(scope="module")
def stages(tmp_path_factory, lab, litert_env):
    root = tmp_path_factory.mktemp("canao")
    teacher = root / "teacher"
    train_teacher(load_config("teacher", "tiny"), teacher)
    supernet = root / "supernet"
    train_supernet(load_config("distill", "tiny"), teacher, supernet)
    latency = root / "latency"
    # LiteRT fp32 too: the search's budgets are speed-ups over the teacher on it.
    fit_latency_model(load_config("latency", "tiny", overrides=[
        f"compile.tuning_dir={root / 'tuning'}", "backends=[tvm, onnxruntime, litert]",
        "compile.peers=[onnxruntime, litert]"]), get_device("x86-1t"), latency, teacher)
    trials = []
    found = root / "search"
    # Deployed at the teacher's LiteRT fp32 speed, and a student for a budget twice as loose.
    search(load_config("search", "tiny", overrides=["min_speedup=1", "front_speedups=[0.5]", "remeasure_rounds=2",
                                                    "baseline_tries=2", "timed_with_teacher=true"]), supernet,
           latency, found,
           on_trial=lambda number, params, metrics: trials.append((number, params, metrics)))
    student = root / "student"
    # Timed on LiteRT fp32 too: the speed-up and the search report are against the teacher on it.
    finalize(load_config("finalize", "tiny", overrides=["bench_backends=[tvm, litert]", "baseline=true",
                                                      "timing_rounds=2"]), teacher,
             supernet, found, student)
    return {"root": root, "teacher": teacher, "supernet": supernet, "latency": latency, "search": found,
            "student": student, "trials": trials}


def test_latency_model_round_trips_through_its_artifact(stages):
    manifest = verify_manifest(stages["latency"])
    model = LatencyModel.load(stages["latency"], BERT_QA)
    assert model.device == "x86-1t" and model.seq_len == 32 and len(model.measurements) == 4
    assert sum(m["heldout"] for m in model.measurements) == 1
    for m in model.measurements:
        assert set(m["ms"]) == {"tvm", "onnxruntime", "litert"} and all(v > 0 for v in m["ms"].values())
    refit = LatencyModel.fit(model.device, model.seq_len, model.teacher, model.measurements, model.family)
    assert refit.coefficients == model.coefficients and refit.error == model.error
    subnet = SubnetConfig.from_dict(model.measurements[0]["subnet"])
    assert model.fastest(subnet) == min((model.predict(subnet, b), b) for b in ("tvm", "onnxruntime", "litert"))
    assert set(manifest["metrics"]["error"]["tvm"]) == {"model", "flops_proxy", "fitted_on", "heldout"}


def test_search_returns_a_non_dominated_front_with_measurements(stages):
    result = json.loads((stages["search"] / FRONT_JSON).read_text())
    front = result["front"]
    assert front and dominated(front, QA) == []
    # No evaluated subnet beats a front point on both objectives.
    for t in result["trials"]:
        for p in front:
            assert not (t["f1"] > p["f1"] and t["predicted_ms"] < p["predicted_ms"])
    for p in front:
        assert set(p) >= {"subnet", "f1", "predicted_ms", "measured_ms", "params", "flops"} and p["flops"] > 0
    # remeasure=1: the most accurate point, then each budget's two finalists (the tiny profile's
    # finalists.count) until both are measured (a point the latency model underpriced leaves its
    # budget once measured; the next one is tried); then each finalist distilled and re-ranked
    measured = [p for p in front if p["measured_ms"] is not None]
    assert max(front, key=lambda p: p["f1"]) in measured
    budgets = [result["latency_budget_ms"], *(b["latency_budget_ms"] for b in result.get("front_budgets", []))]
    chosen = [choose(result, QA, b) for b in budgets]
    for c, b in zip(chosen, budgets, strict=True):
        assert c["measured_ms"] is not None and (not b or c["measured_ms"] <= b)
        finalists = contenders(front, QA, b, 2)
        assert all(RERANKED in p for p in finalists) and c[RERANKED] == max(p[RERANKED] for p in finalists)
    metrics = verify_manifest(stages["search"])["metrics"]
    assert result["rerank"]["per_budget"] == 2 and metrics["rerank_seconds"] > 0 and metrics["baseline_seconds"] > 0
    reranked = [p for p in front if RERANKED in p]
    if len({p["f1"] for p in reranked}) > 1 and len({p[RERANKED] for p in reranked}) > 1:
        assert metrics["finalists_spearman"] == pytest.approx(
            spearmanr([p["f1"] for p in reranked], [p[RERANKED] for p in reranked]).statistic)
    assert set(result["teacher"]["measured_ms_by_backend"]) == {"tvm", "onnxruntime", "litert"}
    assert (stages["search"] / FRONT_PNG).read_bytes()[:4] == b"\x89PNG"
    # six NSGA-II trials, then at most two climbing (tiny: one a round) from the budgets' best points
    assert [n for n, _, _ in stages["trials"]] == list(range(6 + metrics["climb_trials"]))
    assert 0 <= metrics["climb_trials"] <= 2
    assert all({"f1", "predicted_ms", "params"} <= set(m) for _, _, m in stages["trials"])


def test_search_refuses_a_held_out_slice_the_teacher_was_fine_tuned_on(stages, tmp_path):
    # tiny: the teacher saw the first 48 questions, the supernet the first 24, of 11,877
    with pytest.raises(ValueError, match="overlap the first 48 the teacher was fine-tuned on"):
        search(load_config("search", "tiny", overrides=["val_questions=11840"]), stages["supernet"],
               stages["latency"], tmp_path / "search")
    assert not (tmp_path / "search").exists()


def test_search_holds_the_uniform_baseline_at_the_shipped_points_latency(stages):
    result = json.loads((stages["search"] / FRONT_JSON).read_text())
    baseline, shipped = result["baseline"], choose(result, QA)
    subnet = SubnetConfig.from_dict(baseline["subnet"])
    assert subnet.layers[0] == 0 and len(set(subnet.heads)) == len(set(subnet.ffn_sizes)) == 1
    teacher_litert = result["teacher"]["measured_ms_by_backend"]["litert"]
    assert result["latency_budget_ms"] == teacher_litert  # min_speedup 1
    # every re-measured point and baseline candidate timed in turn with the teacher's shape, in the frame
    # of the latency stage's timing of it (the budget's); the frame's model is scratch
    assert result["measured_frame"] == {"model": "the teacher's shape", "backend": "litert", "ms": teacher_litert}
    assert not (stages["search"] / "teacher-shape").exists()
    # the shipped point fits by the latency `choose` reads (measured where re-measured): its prediction
    # may sit a hair over a budget of ~0.03 ms
    # tiny's baseline_tries: each baseline measured to fit (by price alone where none of the tried fits)
    assert point_ms(baseline) <= result["latency_budget_ms"] and point_ms(shipped) <= teacher_litert
    assert 0 <= baseline["f1"] <= 100 and baseline["label"] == subnet.label()
    [looser] = result["front_budgets"]  # 0.5x: a budget of twice the teacher's time, and its own baseline
    assert looser["min_speedup"] == 0.5 and looser["latency_budget_ms"] == 2 * teacher_litert
    assert point_ms(looser["baseline"]) <= looser["latency_budget_ms"]
    for b, budget_ms in ((baseline, result["latency_budget_ms"]), (looser["baseline"], looser["latency_budget_ms"])):
        if b["measured_ms"] is None:  # none of the tried fit: the largest priced within
            assert b["predicted_ms"] <= budget_ms
        else:
            assert b["measured_ms"] == min(b["measured_ms_by_backend"].values())
    # Each baseline was a trial (a seed of the search), so the front holds it or a point that
    # dominates it: the searched choice at any budget is at least the baseline's, by the proxy. (A
    # candidate priced over the search's own budget, the loosest, is an infeasible trial; tiny's
    # uniform subnets are all priced within twice the teacher's time.)
    for b in (baseline, looser["baseline"]):
        assert b["predicted_ms"] <= looser["latency_budget_ms"]
        assert any(p["f1"] >= b["f1"] and p["predicted_ms"] <= b["predicted_ms"] for p in result["front"])


def paired_speedup(metrics: dict, ms: dict, figures: dict | None = None) -> float:
    """The median over timing rounds of the teacher's LiteRT fp32 ms over the model's on its fastest
    backend (by median), each ratio within one round; `figures`: the model's (default: the student's)."""
    rounds = (figures or metrics)["ms_rounds"]
    assert ms == {b: statistics.median(r[b] for r in rounds) for b in ms}
    best = min(ms, key=ms.get)
    return statistics.median(t["litert"] / r[best] for t, r in zip(metrics["teacher_ms_rounds"], rounds, strict=True))


def test_finalize_writes_a_student_that_predicts_compiles_and_is_benchmarked(stages):
    manifest = verify_manifest(stages["student"])
    m = manifest["metrics"]
    assert m["questions"] == 8 and 0 <= m["f1"] <= 100 and "teacher_f1" in m
    assert set(m["student_ms"]) == set(m["teacher_ms"]) == {"tvm", "litert"}
    assert m["timing_rounds"] == 2 and len(m["teacher_ms_rounds"]) == 2
    assert m["teacher_ms"] == {b: statistics.median(r[b] for r in m["teacher_ms_rounds"]) for b in m["teacher_ms"]}
    assert m["speedup_vs_teacher_litert"] == pytest.approx(paired_speedup(m, m["student_ms"]))
    assert not (stages["student"] / "teacher-compiled").exists()
    baseline = m["baseline"]  # finalized alike: same recipe and steps, compiled and timed in the same run
    assert baseline["steps"] == m["steps"] and set(baseline["ms"]) == {"tvm", "litert"}
    assert baseline["speedup_vs_teacher_litert"] == pytest.approx(paired_speedup(m, baseline["ms"], baseline))
    assert 0 <= baseline["best_backend_f1"] <= 100 and set(baseline["final_loss_terms"]) == {"kl", "hidden", "hard"}
    assert QAPredictor.from_dir(stages["student"] / BASELINE_DIR).features_cfg.max_seq_len == 128
    looser = m["budgets"]["0.5x"]  # the looser budget's student and baseline, finalized and timed alike
    for figures, directory in ((looser, stages["student"] / "budgets/0.5x"),
                               (looser["baseline"], stages["student"] / "budgets/0.5x/baseline")):
        assert figures["steps"] == m["steps"] and set(figures["ms"]) == {"tvm", "litert"}
        assert figures["speedup_vs_teacher_litert"] == pytest.approx(paired_speedup(m, figures["ms"], figures))
        assert figures["budget"] == "0.5x" and figures["budget_ms"] > m["budget_ms"]
        assert verify_manifest(directory)["metrics"]["f1"] == figures["f1"]
        assert QAPredictor.from_dir(directory).features_cfg.max_seq_len == 128
    assert verify_manifest(stages["student"] / "compiled")["config"]["device"] == "x86-1t"
    predictor = QAPredictor.from_dir(stages["student"])
    assert predictor.features_cfg.max_seq_len == 128
    answer = predictor.predict([SquadExample("q", "Who wrote it?", "It was written by Ada in 1843.", ())])["q"]
    assert answer.text in "It was written by Ada in 1843."


def test_finalize_copies_the_models_an_earlier_finalize_distilled_alike(stages, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a model distilled alike before was trained again")

    monkeypatch.setattr("canao.qa.finalize.fit", no_training)
    earlier = verify_manifest(stages["student"])["metrics"]
    again = finalize(load_config("finalize", "tiny", overrides=["baseline=true", "benchmark=false"]),
                     stages["teacher"], stages["supernet"], stages["search"], tmp_path / "again",
                     reuse=[stages["root"] / "missing", stages["student"]])["metrics"]
    for (_, _, figures), (_, _, before) in zip(finalized_figures(again), finalized_figures(earlier), strict=True):
        # (a budget that chose another's subnet was a copy of it then, and is now)
        assert figures["reused_from"].startswith(str(stages["student"]))
        assert figures["f1"] == before["f1"] and figures["steps"] == before["steps"]
    # another recipe trains anew
    monkeypatch.undo()
    other = finalize(load_config("finalize", "tiny", overrides=["baseline=false", "benchmark=false", "seed=7"]),
                     stages["teacher"], stages["supernet"], stages["search"], tmp_path / "other",
                     reuse=[stages["student"]])["metrics"]
    assert "reused_from" not in other


def test_finalize_scores_the_fastest_backend_as_compiled_and_eval_qa_agrees(stages, capsys):
    m = verify_manifest(stages["student"])["metrics"]
    assert m["student_best_backend"] == min(m["student_ms"], key=m["student_ms"].get)
    cfg = load_config("finalize", "tiny")
    code = main(["eval-qa", "--model", str(stages["student"] / "compiled"), "--backend", m["student_best_backend"],
                 "--threads", "1", "--data", cfg.data.eval_file, "--questions", str(cfg.data.eval_questions)])
    out = capsys.readouterr()
    assert code == 0 and f"backend {m['student_best_backend']}" in out.err
    scores = json.loads(out.out.strip().splitlines()[-1])
    assert scores["questions"] == 8 and scores["f1"] == pytest.approx(m["student_best_backend_f1"], abs=1e-3)


def test_eval_qa_names_a_backend_a_model_directory_cannot_run(stages, capsys):
    cfg = load_config("finalize", "tiny")
    code = main(["eval-qa", "--model", str(stages["student"]), "--backend", "litert-int8",
                 "--data", cfg.data.eval_file, "--questions", "2"])
    assert code == 2
    assert "--backend: 'litert-int8' needs a compiled artifact" in capsys.readouterr().err
    code = main(["eval-qa", "--model", str(stages["student"] / "compiled"), "--backend", "litert-int8",
                 "--data", cfg.data.eval_file, "--questions", "2"])
    assert code == 2
    assert "has no 'litert-int8' (it has: " in capsys.readouterr().err


def test_cli_names_a_wrong_input(stages, tmp_path, capsys):
    code = main(["search", "--profile", "tiny", "--supernet", str(stages["supernet"]),
                 "--latency", str(stages["search"]), "--out", str(tmp_path / "s")])
    assert code == 2
    assert "a 'search' artifact, not a latency model" in capsys.readouterr().err
    code = main(["finalize", "--profile", "tiny", "--teacher", str(stages["teacher"]), "--supernet",
                 str(stages["supernet"]), "--search", str(stages["search"]), "--out", str(stages["student"]),
                 "--set", "bench_backends=[tvm, litert]", "--set", "train.epochs=2"])
    assert code == 2
    assert "holds a student made with another config" in capsys.readouterr().err


def test_search_report_writes_the_chain_figures_into_its_section_and_keeps_the_rest(stages, tmp_path, capsys):
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(f"# Benchmarks\n\n{SEARCH_SECTION}\n\nan older run\n\n## Serving load test\n\nkept\n")
    assert main(["search-report", "--student", str(stages["student"]), "--benchmarks", str(benchmarks)]) == 0
    document = benchmarks.read_text()
    section = markdown_section(document, SEARCH_SECTION)
    assert "an older run" not in document and "## Serving load test\n\nkept" in document
    assert section.strip() in document and section.strip().splitlines()[-1] in capsys.readouterr().out
    m = verify_manifest(stages["student"])["metrics"]
    front = json.loads((stages["search"] / FRONT_JSON).read_text())
    best = m["student_best_backend"]
    ratios = [t["litert"] / r[best] for t, r in zip(m["teacher_ms_rounds"], m["ms_rounds"], strict=True)]
    assert (f"**{m['speedup_vs_teacher_litert']:.2f}x** (rounds from {min(ratios):.2f}x to {max(ratios):.2f}x) "
            f"on {m['student_best_backend']}") in section and "timed in turn, 2 rounds of a process each" in section
    assert all(f"| {p['label']} |" in section for p in front["front"])
    assert "val F1 after KD |" in section and "distilling each budget's 2 finalists" in section
    error = verify_manifest(stages["latency"])["metrics"]["error"]
    assert all(f"| {b} | {e['fitted_on']} | {e['heldout']} | {e['model']['mape_pct']} |" in section
               for b, e in error.items())
    assert "Goal (>= 8x within 1.5 F1): **" in section
    assert f"| 0.5x ({m['budgets']['0.5x']['budget_ms']:.2f} ms) | uniform baseline | " in section


def test_search_report_names_a_wrong_input(stages, capsys):
    assert main(["search-report", "--student", str(stages["search"])]) == 2
    assert "a 'search' artifact, not a student" in capsys.readouterr().err


def test_bench_students_with_the_supernet_ranks_its_proxy_in_a_section_of_its_own(stages, tmp_path):
    """The proxy study (issue: Spearman of the search's supernet F1 against distilled F1)."""
    subnets = tmp_path / "subnets.json"
    subnets.write_text(json.dumps([{"num_layers": 1, "hidden_size": 16, "heads": [1], "ffn_sizes": [32]},
                                   {"num_layers": 2, "hidden_size": 32, "heads": [2, 2], "ffn_sizes": [64, 64]},
                                   {"num_layers": 2, "hidden_size": 32, "heads": [1, 1], "ffn_sizes": [32, 32]}]))
    benchmarks, out = tmp_path / "BENCHMARKS.md", tmp_path / "proxy.json"
    benchmarks.write_text(f"# Benchmarks\n\n{STUDENTS_SECTION}\n\nkept as it is\n")
    assert main(["bench-students", "--profile", "tiny", "--teacher", str(stages["teacher"]), "--supernet",
                 str(stages["supernet"]), "--subnets", str(subnets), "--questions", "6", "--eval-questions", "4",
                 "--seq-len", "64", "--importance-batches", "1", "--out", str(out), "--benchmarks", str(benchmarks),
                 "--work-dir", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    assert all("supernet_f1" in r for r in result["students"]) and "spearman_supernet_vs_distilled" in result
    section = markdown_section(benchmarks.read_text(), PROXY_SECTION)
    assert "supernet slice F1" in section and "Spearman rank correlation" in section
    assert "kept as it is" in markdown_section(benchmarks.read_text(), STUDENTS_SECTION)
