"""What every component does around its canao call: run the stage (cached by content), put
its numeric metrics on the kfp Metrics output, and open or close the pipeline's MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

from canao.lab.devices import get_device
from canao.mlops import tracking
from canao.mlops.stages import DEPLOYMENT, Context, execute

SUMMARY = "summary.json"  # close_run's: the pipeline run's outcome, both apps


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


def close_run(parent_run_id: str, summary, deployment=None, generation=None) -> None:
    """Log the apps' deployments (`deployment`: question answering's, `generation`: the generation
    student's; a run may make either or both) on the pipeline run, write the run's summary
    (SUMMARY in `summary`: the QA deployment's figures and its front's path, and `generation`)
    and mark the run finished."""
    content, metrics, tags = {}, {}, {}
    if deployment is not None:
        qa_dir = Path(deployment.path)
        qa = json.loads((qa_dir / DEPLOYMENT).read_text())
        if qa["front"]:
            # Here rather than in deploy: a deployment reused from the cache still gets its front
            # logged on this run.
            front_json = qa_dir / qa["front"]
            tracking.log_front(parent_run_id, front_json, front_json.with_suffix(".png"))
        metrics.update(teacher=qa["teacher"], student=qa["student"],
                       speedup_vs_litert_fp32_teacher=qa["speedup_vs_litert_fp32_teacher"])
        tags.update(registry_uri=qa["registry_uri"], backend=qa["backend"]["backend"])
        tracking.log_artifact(parent_run_id, qa_dir / DEPLOYMENT)
        content.update(qa, deployment=str(qa_dir), front=str(qa_dir / qa["front"]) if qa["front"] else None)
    if generation is not None:
        lm_dir = Path(generation.path)
        lm = json.loads((lm_dir / DEPLOYMENT).read_text())
        metrics["generation"] = {"teacher": lm["teacher"], "student": lm["student"]}
        tags.update(generation_registry_uri=lm["registry_uri"], generation_backend=lm["backend"]["backend"])
        tracking.log_artifact(parent_run_id, lm_dir / DEPLOYMENT, "generation")
        content["generation"] = {**lm, "deployment": str(lm_dir)}
    tracking.log(parent_run_id, metrics=metrics, tags=tags)
    out = Path(summary.path)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).write_text(json.dumps(content, indent=1) + "\n")
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
