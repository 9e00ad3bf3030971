"""`canao-compress`: teacher -> distill -> latency -> search -> finalize -> compile ->
benchmark -> deploy, tracked as one MLflow run.

The supernet (distill) and the latency model (latency) both need only the teacher; the
search finds the Pareto front of F1 vs latency under the tightest of `latency_budgets_ms`,
finalize trains the student it chooses. The student is compiled, benchmarked and deployed;
the teacher is compiled and benchmarked too, for the speed-up over LiteRT fp32 on the teacher.

On a cluster every task gets the S3 keys from the Secret `canao-s3`, the S3 endpoint and the
MLflow URI from the Secret `canao-pipeline` (k8s/README.md), the device-lab tracker from the
ConfigMap `canao-config`, and the
data from the PVC `canao-data` at /shared (the image's project root is /app, so configs'
`../shared/data/...` is /shared/data). kfp.local ignores these and uses the environment.
(No `from __future__ import annotations`: kfp reads the annotations as types.)
"""

from kfp import dsl, kubernetes

from components import tasks

SECRETS = {  # Secret -> its keys, each set as the environment variable of the same name
    "canao-s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    "canao-pipeline": ("CANAO_S3_ENDPOINT", "MLFLOW_TRACKING_URI"),
}
CONFIG_MAP = "canao-config"
# CANAO_CACHE_DIR: the stage cache on the PVC below, so a rerun resumes on a cluster as it does here.
CONFIG_ENV = {"CANAO_TRACKER": "CANAO_TRACKER", "CANAO_CACHE_DIR": "CANAO_CACHE_DIR"}
VOLUMES = {"canao-data": "/shared", "canao-cache": "/cache"}  # PVC -> mount path (k8s/base/data.yaml)
# CPU and memory (request = limit) of each task on a cluster, sized for the full profile on the
# 2-core reference machine: distill peaked at 10.7 GB resident (the teacher and the supernet's
# subnets at 256 tokens), the latency stage at 2.9 GB (`/usr/bin/time -v`, Zen 4, 2026-12-03).
RESOURCES = {"teacher": ("2", "12Gi"), "distill": ("2", "12Gi"), "latency": ("2", "4Gi"), "search": ("2", "6Gi"),
             "finalize": ("2", "12Gi"), "compile_model": ("2", "6Gi"), "benchmark": ("2", "4Gi")}
LIGHT = ("500m", "1Gi")  # the bookkeeping tasks: MLflow and S3 calls
# Tasks whose work is calls to MLflow and S3 (the registry): retried on a failure, whose cause is
# most often a server briefly away.
RETRIED = {"open_run", "deploy", "close_run", "end_failed_run"}


def on_cluster(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """`task` (of component `name`) as a cluster runs it; kfp.local ignores all of this.

    kfp's own cache is off for every task: each takes the run's MLflow id, so its key never hits,
    and the tasks with side effects (MLflow runs, registry pushes) must run every time. Resuming
    is canao's stage cache's (its key holds the config and the inputs' content, not the run)."""
    for secret, keys in SECRETS.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={key: key for key in keys})
    kubernetes.use_config_map_as_env(task, config_map_name=CONFIG_MAP, config_map_key_to_env=CONFIG_ENV)
    for pvc, mount in VOLUMES.items():
        kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=mount)
    task.set_caching_options(False)
    cpu, memory = RESOURCES.get(name, LIGHT)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    if name in RETRIED:
        task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
    return task


def run_task(component, **arguments) -> dsl.PipelineTask:
    return on_cluster(component(**arguments), component.name.replace("-", "_"))


def compile_and_benchmark(model, parent, common: dict) -> tuple:
    """The tasks that compile `model` for the device and time it there: (compiled, records)."""
    compiled = run_task(tasks.compile_model, parent_run_id=parent, model=model, **common).outputs["compiled"]
    measured = run_task(tasks.benchmark, parent_run_id=parent, model=model, compiled=compiled, **common)
    return compiled, measured.outputs["records"]


def stages(device: str, profile: str, latency_budgets_ms: list, run_name: str, overrides: dict):
    """Every task of one run, in order; returns the deploy task."""
    common = {"profile": profile, "overrides": overrides, "device": device}
    parent = run_task(tasks.open_run, run_name=run_name, profile=profile, device=device,
                      latency_budgets_ms=latency_budgets_ms).output
    teacher = run_task(tasks.teacher, parent_run_id=parent, **common).outputs["model"]
    supernet = run_task(tasks.distill, parent_run_id=parent, teacher=teacher, **common).outputs["supernet"]
    latency = run_task(tasks.latency, parent_run_id=parent, teacher=teacher, **common).outputs["latency_model"]
    front = run_task(tasks.search, parent_run_id=parent, latency_budgets_ms=latency_budgets_ms, supernet=supernet,
                     latency_model=latency, **common).outputs["front"]
    finalize = run_task(tasks.finalize, parent_run_id=parent, teacher=teacher, supernet=supernet, front=front,
                        **common)
    student = finalize.outputs["model"]
    compiled, records = compile_and_benchmark(student, parent, common)
    _, teacher_records = compile_and_benchmark(teacher, parent, common)
    deployed = run_task(tasks.deploy, parent_run_id=parent, run_name=run_name, teacher=teacher, model=student,
                        compiled=compiled, benchmark=records, teacher_benchmark=teacher_records, front=front,
                        **common)
    run_task(tasks.close_run, parent_run_id=parent, deployment=deployed.outputs["deployment"])
    return deployed


DESCRIPTION = "Compress a QA transformer for a device's latency budget, compile, benchmark and deploy it."


@dsl.pipeline(name="canao-compress", description=DESCRIPTION)
def canao_compress(device: str = "x86-1t", profile: str = "quick", latency_budgets_ms: list = [],  # noqa: B006
                   run_name: str = "canao-compress", overrides: dict = {}) -> dsl.Artifact:  # noqa: B006
    """As `make run` runs it (kfp.local): its output is the deployment, which pipelines/local.py
    summarises; a failure there ends the MLflow run FAILED from pipelines/local.py.
    `overrides`: stage -> list of `key=value` config overrides, e.g. {"compile": ["trials=0"]}."""
    return stages(device, profile, latency_budgets_ms, run_name, overrides).outputs["deployment"]


@dsl.pipeline(name="canao-compress", description=DESCRIPTION)
def canao_compress_on_cluster(device: str = "x86-1t", profile: str = "quick",
                              latency_budgets_ms: list = [],  # noqa: B006
                              run_name: str = "canao-compress", overrides: dict = {}):  # noqa: B006
    """As a cluster runs it (`make pipelines`, `canao submit`): the same tasks inside an exit
    handler, so a failed task ends the MLflow run FAILED rather than RUNNING forever (kfp returns
    no pipeline output from inside one; the deployment is in MLflow and the registry)."""
    with dsl.ExitHandler(run_task(tasks.end_failed_run, run_name=run_name), name="stages"):
        stages(device, profile, latency_budgets_ms, run_name, overrides)
