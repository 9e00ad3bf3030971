"""canao-compress (tiny profile) with kfp's local runner against the real MLflow server,
SeaweedFS S3 store and device lab on 127.0.0.1: teacher -> distill -> latency -> search ->
finalize -> compile and benchmark (student and teacher) -> deploy, and the generation chain
lm-teacher, lm-data -> distill-lm -> latency-lm -> search-lm -> finalize-lm -> benchmark-lm ->
deploy-lm; a failed run resumes from its finished stages, and MLflow's REST API and the S3
bucket hold what the summary says."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

from canao.apps import service
from canao.config import PROJECT_ROOT, ServeConfig
from canao.lab import devices, rpc
from canao.mlops import services, tracking
from canao.mlops.registry import Registry
from pipelines import local
from tests.integration.conftest import live_processes, running_lab, running_services

GENERATION_STAGES = ("lm-teacher", "lm-data", "distill-lm", "latency-lm", "search-lm", "finalize-lm", "benchmark-lm",
                     "deploy-lm")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    project = yaml.safe_load(devices.devices_file(devices.DEVICES_FILE).read_text())
    (root / "devices.yaml").write_text(yaml.safe_dump({"x86-1t": project["x86-1t"]}))
    with running_services(root / "services") as state, pytest.MonkeyPatch.context() as mp:
        mp.setenv("CANAO_CACHE_DIR", str(root / "cache"))
        mp.setenv("CANAO_DEVICES", str(root / "devices.yaml"))
        yield root, state


def rest(endpoint: str, **query) -> dict:
    url = f"{tracking.tracking_uri()}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def child_runs(parent_id: str, experiment_id: str) -> list[tuple[str, dict]]:
    """(run name, tags) of each child run of `parent_id`; the names repeat (two compiles)."""
    request = urllib.request.Request(
        f"{tracking.tracking_uri()}/api/2.0/mlflow/runs/search", method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [experiment_id],
                         "filter": f"tags.mlflow.parentRunId = '{parent_id}'"}).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        runs = json.loads(response.read())["runs"]
    return [(r["info"]["run_name"], {t["key"]: t["value"] for t in r["data"]["tags"]}) for r in runs]


def test_pipeline_resumes_after_a_failed_stage_and_records_what_its_summary_says(workspace, monkeypatch):
    root, _ = workspace
    tuning = root / "tuning"
    # finalize times only what it trains beyond the student; here the student alone, which the
    # compile and benchmark tasks time
    overrides = {"compile": [f"tuning_dir={tuning}"], "latency": [f"compile.tuning_dir={tuning}"],
                 "finalize": ["benchmark=false"],
                 # the decoder latency model on llama.cpp alone: TVM's decoders have tests of their own
                 "latency-lm": ["backends=[llama.cpp]"]}
    budgets = [25.0, 10.0]
    # No device lab: the stages that need none (teacher, distill, compile, and the generation chain,
    # which times on this machine) may finish, the first that measures through the lab (latency,
    # benchmark) fails.
    monkeypatch.setenv("CANAO_LAB_DIR", str(root / "no-lab"))
    with pytest.raises(RuntimeError, match="latency|benchmark"):
        local.run("tiny", "x86-1t", budgets, overrides, root / "runs", None)
    finished = Counter(p.parent.parent.name for p in (root / "cache").glob("*/*/manifest.json"))
    assert finished["teacher"] == 1 and set(finished) <= {"teacher", "distill", "compile", *GENERATION_STAGES}
    mlflow = tracking.client()
    runs = mlflow.search_runs([mlflow.get_experiment_by_name(tracking.EXPERIMENT).experiment_id],
                              filter_string="tags.`canao.kind` = 'pipeline'")
    assert [r.info.status for r in runs] == ["FAILED"]  # the failed run's MLflow run says so

    (root / "lab").mkdir()
    with running_lab(root / "lab", {"x86-1t": yaml.safe_load((root / "devices.yaml").read_text())["x86-1t"]}):
        summary = local.run("tiny", "x86-1t", budgets, overrides, root / "runs", root / "summary.json")
    assert json.loads((root / "summary.json").read_text()) == summary
    assert summary["registry_uri"] in local.describe(summary)
    for block in ("teacher", "student"):
        assert {"dir", "exact_match", "f1"} <= set(summary[block])
    student = summary["student"]
    assert not student["is_teacher"] and student["dir"] != summary["teacher"]["dir"]
    # one finalized student per budget (tiny: the deployed one only) and no baseline (tiny skips it)
    [finalized] = summary["students"]
    assert finalized["budget"] == "deployed" and finalized["config"] == student["config"]
    assert {"dir", "backend", "speedup_vs_litert_fp32_teacher", "exact_match", "f1"} <= set(finalized)
    assert summary["baseline"] == []
    front = json.loads(Path(summary["front"]).read_text())
    assert front["latency_budget_ms"] == 10.0  # the tightest budget
    assert student["config"] in [point["subnet"] for point in front["front"]]
    assert student["params"] > 0 and student["flops"] > 0 and student["seq_len"] == 32
    assert summary["device"] == "x86-1t"
    assert summary["speedup_vs_litert_fp32_teacher"] is None  # the tiny profile exports no LiteRT model

    # MLflow: the parent run, finished, with a child run per task (those finished before from the
    # cache), one per search candidate, and the front.
    run = rest("runs/get", run_id=summary["mlflow_run_id"])["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run["info"]["status"] == "FINISHED"
    assert tags["device"] == "x86-1t" and tags["profile"] == "tiny" and len(tags["git_commit"]) == 40
    assert tags["registry_uri"] == summary["registry_uri"]
    children = child_runs(summary["mlflow_run_id"], run["info"]["experiment_id"])
    tasks = Counter(teacher=1, distill=1, latency=1, search=1, finalize=1, compile=2, benchmark=2, deploy=1,
                    **dict.fromkeys(GENERATION_STAGES, 1))
    assert Counter((name, t["cached"]) for name, t in children if "cached" in t) == Counter(
        {**{(stage, "true"): n for stage, n in finished.items()},
         **{(stage, "false"): n - finished[stage] for stage, n in tasks.items() if n > finished[stage]}})
    candidates = [name for name, t in children if t.get("candidate") and t["stage"] == "search"]
    assert len(candidates) == len(front["trials"]) and all(name.startswith("candidate-") for name in candidates)
    history = rest("metrics/get-history", run_id=summary["mlflow_run_id"], metric_key="front.f1")["metrics"]
    assert sorted(m["value"] for m in history) == sorted(point["f1"] for point in front["front"])
    artifacts = rest("artifacts/list", run_id=summary["mlflow_run_id"], path="front")["files"]
    assert sorted(a["path"] for a in artifacts) == ["front/front.json", "front/front.png"]
    assert summary["mlflow_url"].endswith(summary["mlflow_run_id"])
    version = rest("registered-models/alias", name="canao-qa", alias="tiny")["model_version"]
    assert version["source"] == summary["registry_uri"] and version["run_id"] == summary["mlflow_run_id"]
    assert summary["mlflow_model"]["promoted"] and summary["mlflow_model"]["version"] == version["version"]
    with pytest.raises(tracking.TrackingError, match="model 'canao-qa' has alias 'production'"):
        tracking.model_source("canao-qa", "production")  # a tiny run never moves production's alias

    # S3: the version the summary names, complete, with the chosen backend and the compiled artifact.
    manifest = Registry("canao").manifest("canao-qa", summary["registry_version"])
    assert manifest["uri"] == summary["registry_uri"]
    assert manifest["backends"]["x86-1t"]["backend"] == summary["backend"]["backend"]
    assert {"model/model.safetensors", "compiled/x86-1t/tvm/model.so", "compiled/x86-1t/manifest.json"} <= set(
        manifest["files"])
    assert manifest["lineage"]["mlflow_run_id"] == summary["mlflow_run_id"]

    # Generation: the deployed student, in the registry with its GGUF export, under the tiny alias.
    generation = summary["generation"]
    lm_student, lm_teacher = generation["student"], generation["teacher"]
    assert {"dir", "gguf", "perplexity", "speedup_vs_llamacpp_teacher", "registry_uri"} <= set(lm_student)
    assert {"dir", "gguf", "perplexity", "ms_per_token"} <= set(lm_teacher)
    assert generation["students"] == [lm_student] and "greedy_agreement" in lm_student
    assert lm_student["speedup_vs_llamacpp_teacher"] == pytest.approx(
        lm_teacher["ms_per_token"] / lm_student["ms_per_token"])
    assert lm_student["backend"] == generation["backend"]["backend"] in ("llama.cpp", "torch")
    assert generation["registry_uri"] in local.describe(summary) and tags["generation_registry_uri"] == \
        generation["registry_uri"]
    lm_version = rest("registered-models/alias", name="canao-generation", alias="tiny")["model_version"]
    assert lm_version["source"] == generation["registry_uri"] == lm_student["registry_uri"]
    assert generation["mlflow_model"]["promoted"] and generation["mlflow_model"]["version"] == lm_version["version"]
    lm_manifest = Registry("canao").manifest("canao-generation", generation["registry_version"])
    assert {"model/model.safetensors", "model/model.gguf", "model/manifest.json"} <= set(lm_manifest["files"])
    assert lm_manifest["backends"]["x86-1t"]["backend"] == lm_student["backend"]
    artifacts = rest("artifacts/list", run_id=summary["mlflow_run_id"], path="generation")["files"]
    assert [a["path"] for a in artifacts] == ["generation/deployment.json"]
    # What `canao serve --lm-model canao-generation@tiny` loads: the pulled student directory, GGUF included.
    monkeypatch.setenv("CANAO_REGISTRY_CACHE", str(root / "pulled"))
    pulled = service.pull_model("canao-generation@tiny", ServeConfig(), "--lm-model")
    assert (pulled / "model.gguf").is_file() and pulled.name == "model"
    decoder, info = service.load_lm(pulled, ServeConfig())
    assert info.backend == decoder.backend in ("llama.cpp", "torch")

    # One app alone: generation's chain, every stage from the cache, summarised without a QA block.
    alone = local.run("tiny", "x86-1t", budgets, overrides, root / "runs", None, apps=("generation",))
    assert "student" not in alone and alone["generation"]["registry_uri"] == generation["registry_uri"]
    assert "generation" in local.describe(alone)


def test_front_and_candidates_are_logged_for_comparison(workspace, tmp_path):
    parent = tracking.start_pipeline_run("front-test", {"device": "x86-1t", "profile": "tiny"}, {})
    tracking.log_candidate(parent, 0, {"num_layers": 2, "hidden_size": 64}, {"f1": 40.0, "latency_ms": 3.0})
    front = tmp_path / "front.json"
    front.write_text(json.dumps({"front": [{"f1": 40.0, "latency_ms": 3.0}, {"f1": 50.0, "latency_ms": 6.0}]}))
    tracking.log_front(parent, front)
    history = rest("metrics/get-history", run_id=parent, metric_key="front.f1")["metrics"]
    assert sorted((m["step"], m["value"]) for m in history) == [(0, 40.0), (1, 50.0)]
    artifacts = rest("artifacts/list", run_id=parent, path="front")["files"]
    assert [a["path"] for a in artifacts] == ["front/front.json"]
    experiment = rest("runs/get", run_id=parent)["run"]["info"]["experiment_id"]
    assert dict(child_runs(parent, experiment))["candidate-0"]["stage"] == "search"


def test_a_stop_signal_while_servers_start_is_acted_on_once_starting_has_ended():
    """Raised at once, SIGTERM could land inside Popen, before the child is recorded for the
    `finally` that stops it; held, it stops `make run` as soon as starting is over."""
    previous = signal.signal(signal.SIGTERM, local._on_stop_signal)
    finished_starting = False
    try:
        with pytest.raises(SystemExit) as stopped:
            with local._stop_signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)  # the handler has run by now
                finished_starting = True
            pytest.fail("the held signal was not acted on")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert finished_starting and stopped.value.code == 128 + signal.SIGTERM
    with pytest.raises(SystemExit):  # outside starting, at once
        local._on_stop_signal(signal.SIGTERM, None)


def test_sigterm_while_starting_stops_what_make_run_started(tmp_path):
    """`make run` stopped with SIGTERM as the device lab comes up exits, and leaves no MLflow,
    SeaweedFS or device-lab process behind (they run in sessions of their own, so only the
    pipeline's own `finally` can stop them)."""
    project = yaml.safe_load(devices.devices_file(devices.DEVICES_FILE).read_text())
    (tmp_path / "devices.yaml").write_text(yaml.safe_dump({"x86-1t": project["x86-1t"]}))
    env = {k: v for k, v in os.environ.items() if k != "CANAO_TRACKER"} | {
        "CANAO_SERVICES_DIR": str(tmp_path / "services"), "CANAO_LAB_DIR": str(tmp_path / "lab"),
        "CANAO_DEVICES": str(tmp_path / "devices.yaml"), "CANAO_CACHE_DIR": str(tmp_path / "cache")}
    mlflow_port, s3_port, lab_port = services.free_ports(3)
    process = subprocess.Popen([sys.executable, "-m", "pipelines.local", "--profile", "tiny",
                                "--mlflow-port", str(mlflow_port), "--s3-port", str(s3_port),
                                "--lab-port", str(lab_port)], cwd=PROJECT_ROOT, env=env)
    services_state = tmp_path / "services" / services.state_file().name
    try:
        deadline = time.monotonic() + 180
        while not services_state.exists():  # MLflow and SeaweedFS answer; the lab starts next
            assert process.poll() is None and time.monotonic() < deadline, "make run ended before its services were up"
            time.sleep(0.05)
        started = json.loads(services_state.read_text())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    finally:  # whatever the outcome, nothing of this test outlives it
        process.kill()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CANAO_SERVICES_DIR", env["CANAO_SERVICES_DIR"])
            mp.setenv("CANAO_LAB_DIR", env["CANAO_LAB_DIR"])
            leftovers = services.down()["stopped"] + rpc.down()["stopped"]
    assert leftovers == []  # no state file was left: make run removed both
    for port in (mlflow_port, s3_port, lab_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    services_groups = {started["mlflow"]["pid"], started["s3"]["pid"]}  # each started in a session of its own
    assert not [cmd for group, cmd in live_processes().values()
                if group in services_groups or str(tmp_path) in cmd or f"127.0.0.1:{lab_port}" in cmd]
