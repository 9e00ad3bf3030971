"""What every component does around its canao call: run the stage (cached by content), put
its numeric metrics on the kfp Metrics output, and open or close the pipeline's MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

from canao.lab.devices import get_device
from canao.mlops import tracking
from canao.mlops.stages import DEPLOYMENT, Context, execute


def run_stage(stage: str, profile: str, overrides: dict, inputs: dict, out, metrics, device: str,
              parent_run_id: str, pipeline_run: str = "") -> dict:
    """`out` and `metrics` are kfp output artifacts; `inputs` maps names to kfp input artifacts."""
    manifest, cached = execute(stage, profile, list(overrides.get(stage, [])),
                               {name: artifact.path for name, artifact in inputs.items()}, out.path,
                               Context(device=get_device(device), parent_run_id=parent_run_id,
                                       pipeline_run=pipeline_run))
    out.metadata.update({"stage": stage, "cached": cached, "config_hash": manifest.get("config_hash") or ""})
    for name, value in tracking.numeric(manifest["metrics"]).items():
        metrics.log_metric(name, value)
    return manifest


def with_latency_budget(overrides: dict, latency_budgets_ms: list) -> dict:
    """`overrides` with the search's `latency_budget_ms` set to the tightest budget: the
    pipeline ships one student, and one that meets the tightest budget meets them all. An empty
    list leaves the profile's own budget (configs/<profile>/search.yaml) alone."""
    if any(isinstance(b, bool) or not isinstance(b, int | float) or b <= 0 for b in latency_budgets_ms):
        raise ValueError(f"latency_budgets_ms: expected a list of positive numbers, got {latency_budgets_ms!r}")
    if not latency_budgets_ms:
        return overrides
    return {**overrides, "search": [*overrides.get("search", []), f"latency_budget_ms={min(latency_budgets_ms)}"]}


def open_run(run_name: str, profile: str, device: str, latency_budgets_ms: list) -> str:
    return tracking.start_pipeline_run(run_name, {"device": device, "profile": profile, "pipeline_run": run_name},
                                       {"device": device, "profile": profile, "latency_budgets_ms": latency_budgets_ms})


def close_run(parent_run_id: str, deployment) -> None:
    """Log the deployment's outcome on the pipeline run and mark it finished."""
    summary = json.loads((Path(deployment.path) / DEPLOYMENT).read_text())
    if summary["front"]:
        # Here rather than in deploy: a deployment reused from the cache still gets its front
        # logged on this run.
        front_json = Path(deployment.path) / summary["front"]
        tracking.log_front(parent_run_id, front_json, front_json.with_suffix(".png"))
    tracking.log(parent_run_id, metrics={"teacher": summary["teacher"], "student": summary["student"],
                                         "speedup_vs_litert_fp32_teacher": summary["speedup_vs_litert_fp32_teacher"]},
                 tags={"registry_uri": summary["registry_uri"], "backend": summary["backend"]["backend"]})
    tracking.log_artifact(parent_run_id, Path(deployment.path) / DEPLOYMENT)
    tracking.end_run(parent_run_id)


def end_failed_run(run_name: str, state: str) -> None:
    """The exit handler's work: a pipeline that did not succeed leaves its MLflow run (found by its
    name: an exit task takes no other task's output) FAILED, not RUNNING; a successful one was
    closed FINISHED by close_run, and one that failed before opening its run has none."""
    if state == "SUCCEEDED":
        return
    try:
        run_id = tracking.find_pipeline_run(run_name)
    except tracking.TrackingError:
        return
    tracking.end_run(run_id, "FAILED")
