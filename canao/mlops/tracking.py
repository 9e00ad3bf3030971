"""MLflow tracking: the only module that imports mlflow.

One parent run per pipeline run; a child run per stage and per search candidate, each
with the stage's config as params, its numeric metrics, and the tags device, git commit,
profile and stage. Pipeline steps run in separate processes (kfp), so everything goes
through `MlflowClient` and run ids, never through mlflow's process-global active run.
The server is env MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from canao.config import PROJECT_ROOT

EXPERIMENT = "canao-compress"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for one param value
BATCH = 900  # MLflow accepts at most 1000 metrics, 100 params per log_batch call
PARAM_BATCH = 90


class TrackingError(RuntimeError):
    """The tracking server cannot be reached or refused a request; the message names it."""


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError("MLFLOW_TRACKING_URI: not set; point it at the MLflow server (make up starts one)")
    return uri


def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def git_commit() -> str:
    """The commit this code is at: git where there is a checkout, else env CANAO_GIT_COMMIT (the image's)."""
    try:
        done = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("CANAO_GIT_COMMIT", "unknown")


def flatten(data: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def numeric(data: dict) -> dict[str, float]:
    """The numeric leaves of `data`, flattened: what can be an MLflow metric."""
    return {k: float(v) for k, v in flatten(data).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _experiment_id(mlflow: MlflowClient, name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else mlflow.create_experiment(name)


def _call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except MlflowException as e:
        raise TrackingError(f"MLflow at {tracking_uri()}: {what} failed: {e}") from None


def start_pipeline_run(run_name: str, tags: dict[str, str], params: dict, experiment: str = EXPERIMENT) -> str:
    """Create the parent run of one pipeline run; returns its id."""
    mlflow = client()
    experiment_id = _call("finding the experiment", _experiment_id, mlflow, experiment)
    run = _call("creating the pipeline run", mlflow.create_run, experiment_id, run_name=run_name,
                tags={**tags, "git_commit": git_commit(), "canao.kind": "pipeline"})
    log(run.info.run_id, params=params)
    return run.info.run_id


def find_pipeline_run(run_name: str, experiment: str = EXPERIMENT) -> str:
    """The id of the pipeline run named `run_name`."""
    mlflow = client()
    experiment_id = _call("finding the experiment", _experiment_id, mlflow, experiment)
    runs = _call("searching runs", mlflow.search_runs, [experiment_id],
                 filter_string=f"tags.pipeline_run = '{run_name}' and tags.`canao.kind` = 'pipeline'")
    if len(runs) != 1:
        raise TrackingError(f"MLflow at {tracking_uri()}: expected one pipeline run named {run_name}, "
                            f"found {len(runs)}")
    return runs[0].info.run_id


def start_child_run(parent_run_id: str, run_name: str, tags: dict[str, str]) -> str:
    """A child run of `parent_run_id`, inheriting its device and profile tags."""
    mlflow = client()
    parent = _call("reading the pipeline run", mlflow.get_run, parent_run_id)
    inherited = {k: v for k, v in parent.data.tags.items() if k in ("device", "profile", "git_commit")}
    run = _call("creating a child run", mlflow.create_run, parent.info.experiment_id, run_name=run_name,
                tags={**inherited, **tags, "mlflow.parentRunId": parent_run_id})
    return run.info.run_id


def log(run_id: str, params: dict | None = None, metrics: dict | None = None, tags: dict | None = None,
        step: int = 0) -> None:
    """Params (flattened, as strings), numeric metrics (flattened) and tags, in batches."""
    mlflow = client()
    params_list = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                   for k, v in flatten(params or {}).items()]
    for p in params_list:
        if len(p.value) > MAX_PARAM_LENGTH:
            raise TrackingError(f"param {p.key}: value longer than {MAX_PARAM_LENGTH} characters")
    metrics_list = [Metric(k, v, 0, step) for k, v in numeric(metrics or {}).items()]
    tags_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, len(params_list), PARAM_BATCH):
        _call("logging params", mlflow.log_batch, run_id, params=params_list[i:i + PARAM_BATCH])
    for i in range(0, len(metrics_list), BATCH):
        _call("logging metrics", mlflow.log_batch, run_id, metrics=metrics_list[i:i + BATCH])
    if tags_list:
        _call("logging tags", mlflow.log_batch, run_id, tags=tags_list)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    _call(f"uploading {path}", client().log_artifact, run_id, str(path), artifact_path)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    _call("closing a run", client().set_terminated, run_id, status)


def log_stage(parent_run_id: str, stage: str, manifest: dict, cached: bool) -> str:
    """A finished stage as a child run: its config, metrics and where its artifact came from."""
    run_id = start_child_run(parent_run_id, stage, {"stage": stage, "cached": str(cached).lower()})
    log(run_id, params=manifest.get("config", {}), metrics=manifest.get("metrics", {}),
        tags={"config_hash": manifest.get("config_hash") or ""})
    end_run(run_id)
    return run_id


def log_candidate(parent_run_id: str, number: int, params: dict, metrics: dict, stage: str = "search") -> str:
    """One candidate of the `stage` search as a child run (its `on_trial` hook)."""
    run_id = start_child_run(parent_run_id, f"candidate-{number}", {"stage": stage, "candidate": str(number)})
    log(run_id, params=params, metrics=metrics)
    end_run(run_id)
    return run_id


def log_front(run_id: str, front_json: str | Path, front_png: str | Path | None = None) -> None:
    """The Pareto front as artifacts (JSON, PNG) and as metrics: every numeric field of point i
    is metric `front.<field>` at step i, so the fronts of several runs overlay in the MLflow UI."""
    front_json = Path(front_json)
    data = json.loads(front_json.read_text())
    points = data["front"] if isinstance(data, dict) else data
    if not isinstance(points, list):
        raise ValueError(f"{front_json}: expected a list of points or an object with a `front` list")
    for step, point in enumerate(points):
        log(run_id, metrics={"front": point}, step=step)
    log(run_id, metrics={"front_size": len(points)})
    log_artifact(run_id, front_json, "front")
    if front_png is not None:
        log_artifact(run_id, front_png, "front")


# A promotion lock older than this is a deploy that died holding it: the next deploy takes it over.
STALE_LOCK_SECONDS = 600


# The figures a gate judges: quality ones by which way is better, latency ones (lower is better) by how
# their refusal reads.
HIGHER_IS_BETTER = {"f1": True, "perplexity": False}
LATENCY_READS = {"p50_ms": "p50 {:.2f} ms", "ms_per_token": "{:.2f} ms per token"}


@dataclass(frozen=True)
class Gate:
    """What a version must show before an alias moves to it: its quality figure within a bound and
    no worse than the alias holder's, its latency figure under a ceiling. Bounds are named as the
    deploy config names them: min_<quality> (higher is better) or max_<quality>, max_<latency>."""

    quality: str  # a key of HIGHER_IS_BETTER: "f1" (QA, held-out) or "perplexity" (generation, held-out)
    quality_bound: float  # the floor (higher is better) or ceiling of `quality`; 0: none
    latency: str  # a key of LATENCY_READS: "p50_ms" (QA) or "ms_per_token" (generation)
    max_latency: float  # the ceiling of `latency`; 0: none

    def __post_init__(self):
        if self.quality not in HIGHER_IS_BETTER or self.latency not in LATENCY_READS:
            raise ValueError(f"Gate: quality must be one of {', '.join(HIGHER_IS_BETTER)} and latency one of "
                             f"{', '.join(LATENCY_READS)}, got {self.quality!r} and {self.latency!r}")


def register_model(name: str, source_uri: str, run_id: str, alias: str, tags: dict[str, str],
                   figures: dict[str, float], gate: Gate) -> dict:
    """A Model Registry version of `name` pointing at `source_uri`, its `figures` (`gate`'s quality
    and latency among them) kept as tags; `alias` moves to it only if it passes `gate` and its
    quality is no worse than that of the version the alias holds, checked and moved under the
    alias's promotion lock (one compare-and-set, whatever else deploys at the same time). Returns
    {"version", "promoted", "reason", "previous"} (previous: the version the alias held, or None)."""
    mlflow = client()
    try:
        mlflow.get_registered_model(name)
    except MlflowException:
        _call("creating the registered model", mlflow.create_registered_model, name)
    version = _call("creating a model version", mlflow.create_model_version, name, source=source_uri,
                    run_id=run_id, tags={**tags, **{k: repr(float(v)) for k, v in figures.items()}}).version
    with _promotion_lock(mlflow, name, alias):
        try:
            holder = mlflow.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            # an alias nobody set (MLflow 3 answers 400 INVALID_PARAMETER_VALUE); any other failure must
            # not pass for "no holder", or a worse version would take the alias uncompared
            if e.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                raise TrackingError(f"MLflow at {tracking_uri()}: reading {name}@{alias} failed: {e}") from None
            holder = None
        reason = _refusal(figures, gate, holder)
        if reason is None:
            _call("setting the alias", mlflow.set_registered_model_alias, name, alias, version)
    previous = holder.version if holder else None
    return {"version": str(version), "promoted": reason is None, "previous": previous,
            "reason": reason or (f"{name}@{alias}: version {previous} -> {version}" if previous else
                                 f"{name}@{alias}: first version {version}")}


def _refusal(figures: dict[str, float], gate: Gate, holder) -> str | None:
    """Why a version with `figures` must not take the alias from `holder` (a ModelVersion or None)."""
    quality, ms = figures[gate.quality], figures[gate.latency]
    higher = HIGHER_IS_BETTER[gate.quality]
    name = "F1" if gate.quality == "f1" else gate.quality
    worse, bound = ("below", "min") if higher else ("above", "max")

    def worse_than(reference: float) -> bool:
        return quality < reference if higher else quality > reference

    if gate.quality_bound and worse_than(gate.quality_bound):
        return (f"{name} {quality:.2f} is {worse} the deploy config's {bound}_{gate.quality} "
                f"{gate.quality_bound:g}")
    if gate.max_latency and ms > gate.max_latency:
        return (f"{LATENCY_READS[gate.latency].format(ms)} is over the deploy config's max_{gate.latency} "
                f"{gate.max_latency:g}")
    held = holder.tags.get(gate.quality) if holder else None
    if held is not None and worse_than(float(held)):
        return (f"{name} {quality:.2f} is {worse} the {name} {float(held):.2f} of version {holder.version}, "
                "which the alias holds")
    return None


@contextlib.contextmanager
def _promotion_lock(mlflow: MlflowClient, name: str, alias: str):
    """Held while an alias is compared and moved: a registered model named for it, which the
    server creates for one caller only (its name is unique)."""
    lock = f"{name}.{alias}.promotion-lock"
    for attempt in range(2):
        try:
            mlflow.create_registered_model(lock, description="held by a canao deploy promoting this alias")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise TrackingError(f"MLflow at {tracking_uri()}: taking the promotion lock {lock!r} failed: {e}") \
                    from None
            held = _call("reading the promotion lock", mlflow.get_registered_model, lock)
            age = time.time() - held.creation_timestamp / 1000
            if attempt or age < STALE_LOCK_SECONDS:
                raise TrackingError(f"MLflow at {tracking_uri()}: another deploy holds the promotion lock {lock!r} "
                                    f"(for {age:.0f} s); retry when it is done") from None
            _call("removing a stale promotion lock", mlflow.delete_registered_model, lock)
    try:
        yield
    finally:
        _call("releasing the promotion lock", mlflow.delete_registered_model, lock)


def model_source(name: str, alias: str) -> str:
    """The source URI (the S3 registry version) of the version of registered model `name`
    that `alias` points at."""
    try:
        version = client().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise TrackingError(f"MLflow at {tracking_uri()}: no version of registered model {name!r} has alias "
                            f"{alias!r} ({e.error_code})") from None
    return version.source


def run_url(run_id: str) -> str:
    run = _call("reading a run", client().get_run, run_id)
    return f"{tracking_uri().rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
