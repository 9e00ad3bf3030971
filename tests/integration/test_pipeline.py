"""canao-compress (tiny profile) with kfp's local runner against the real MLflow server,
SeaweedFS S3 store and device lab on 127.0.0.1: a failed run resumes from its finished
stages, and MLflow's REST API and the S3 bucket hold what the summary says."""

import json
import urllib.parse
import urllib.request

import pytest
import yaml

from canao import device_lab, tracking
from canao.registry import Registry
from pipelines import local
from tests.integration.conftest import running_lab, running_services


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    project = yaml.safe_load(device_lab.devices_file(device_lab.DEVICES_FILE).read_text())
    (root / "devices.yaml").write_text(yaml.safe_dump({"x86-1t": project["x86-1t"]}))
    with running_services(root / "services") as state, pytest.MonkeyPatch.context() as mp:
        mp.setenv("CANAO_CACHE_DIR", str(root / "cache"))
        mp.setenv("CANAO_DEVICES", str(root / "devices.yaml"))
        yield root, state


def rest(endpoint: str, **query) -> dict:
    url = f"{tracking.tracking_uri()}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def child_runs(parent_id: str, experiment_id: str) -> dict[str, dict]:
    request = urllib.request.Request(
        f"{tracking.tracking_uri()}/api/2.0/mlflow/runs/search", method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [experiment_id],
                         "filter": f"tags.mlflow.parentRunId = '{parent_id}'"}).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        runs = json.loads(response.read())["runs"]
    return {r["info"]["run_name"]: {t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs}


def test_pipeline_resumes_after_a_failed_stage_and_records_what_its_summary_says(workspace, monkeypatch):
    root, _ = workspace
    overrides = {"compile": [f"tuning_dir={root / 'tuning'}"]}
    # No device lab: teacher and compile finish, the benchmark cannot reach a device and fails.
    monkeypatch.setenv("CANAO_LAB_DIR", str(root / "no-lab"))
    with pytest.raises(RuntimeError, match="benchmark"):
        local.run("tiny", "x86-1t", [10.0], overrides, root / "runs", None)
    assert {p.parent.parent.name for p in (root / "cache").glob("*/*/manifest.json")} == {"teacher", "compile"}
    mlflow = tracking.client()
    runs = mlflow.search_runs([mlflow.get_experiment_by_name(tracking.EXPERIMENT).experiment_id],
                              filter_string="tags.`canao.kind` = 'pipeline'")
    assert [r.info.status for r in runs] == ["FAILED"]  # the failed run's MLflow run says so

    (root / "lab").mkdir()
    with running_lab(root / "lab", {"x86-1t": yaml.safe_load((root / "devices.yaml").read_text())["x86-1t"]}):
        summary = local.run("tiny", "x86-1t", [10.0], overrides, root / "runs", root / "summary.json")
    assert json.loads((root / "summary.json").read_text()) == summary
    assert summary["registry_uri"] in local.describe(summary)
    for block in ("teacher", "student"):
        assert {"dir", "exact_match", "f1"} <= set(summary[block])
    assert summary["student"]["is_teacher"] and summary["student"]["config"]["num_layers"] == 2
    assert summary["student"]["params"] > 0 and summary["student"]["flops"] > 0 and summary["student"]["seq_len"] == 32
    assert summary["device"] == "x86-1t" and "front" in summary
    assert "speedup_vs_litert_fp32_teacher" in summary  # None: the tiny profile exports no LiteRT model

    # MLflow: the parent run, finished, with a child run per stage; the two finished before came from the cache.
    run = rest("runs/get", run_id=summary["mlflow_run_id"])["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run["info"]["status"] == "FINISHED"
    assert tags["device"] == "x86-1t" and tags["profile"] == "tiny" and len(tags["git_commit"]) == 40
    assert tags["registry_uri"] == summary["registry_uri"]
    children = child_runs(summary["mlflow_run_id"], run["info"]["experiment_id"])
    assert {name: t["cached"] for name, t in children.items()} == {
        "teacher": "true", "compile": "true", "benchmark": "false", "deploy": "false"}
    assert summary["mlflow_url"].endswith(summary["mlflow_run_id"])
    version = rest("registered-models/alias", name="canao-qa", alias="production")["model_version"]
    assert version["source"] == summary["registry_uri"] and version["run_id"] == summary["mlflow_run_id"]

    # S3: the version the summary names, complete, with the chosen backend and the compiled artifact.
    manifest = Registry("canao").manifest("canao-qa", summary["registry_version"])
    assert manifest["uri"] == summary["registry_uri"]
    assert manifest["backends"]["x86-1t"]["backend"] == summary["backend"]["backend"]
    assert {"model/model.safetensors", "compiled/x86-1t/tvm/model.so", "compiled/x86-1t/manifest.json"} <= set(
        manifest["files"])
    assert manifest["lineage"]["mlflow_run_id"] == summary["mlflow_run_id"]


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
    assert child_runs(parent, experiment)["candidate-0"]["stage"] == "search"
