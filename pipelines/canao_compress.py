"""`canao-compress`: both apps' chains, tracked as one MLflow run. Question answering:
teacher -> distill -> latency -> search -> finalize -> compile -> benchmark -> deploy.
Generation: lm-teacher and lm-data -> distill-lm -> latency-lm -> search-lm -> finalize-lm ->
benchmark-lm -> deploy-lm. close_run writes the run's summary of both.

The supernet (distill) and the latency model (latency) both need only the teacher; the
search finds the Pareto front of F1 vs latency under the tightest of `latency_budgets_ms`,
finalize trains the student it chooses. The student is compiled, benchmarked and deployed;
the teacher is compiled and benchmarked too, for the speed-up over LiteRT fp32 on the teacher.
The generation chain alike: its student is served by llama.cpp on its GGUF export (or
PyTorch), timed beside llama.cpp on the teacher's GGUF file, its speed-up's reference.

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
# The generation stages' sizes are not measured yet: the QA stages' of the same kind stand in for them.
RESOURCES = {"teacher": ("2", "12Gi"), "distill": ("2", "12Gi"), "latency": ("2", "4Gi"), "search": ("2", "6Gi"),
             "finalize": ("2", "12Gi"), "compile_model": ("2", "6Gi"), "benchmark": ("2", "4Gi"),
             "lm_teacher": ("2", "4Gi"), "distill_lm": ("2", "12Gi"), "latency_lm": ("2", "4Gi"),
             "search_lm": ("2", "6Gi"), "finalize_lm": ("2", "12Gi"), "benchmark_lm": ("2", "4Gi")}
LIGHT = ("500m", "1Gi")  # the bookkeeping tasks: MLflow and S3 calls
# Tasks whose work is calls to MLflow and S3 (the registry): retried on a failure, whose cause is
# most often a server briefly away.
RETRIED = {"open_run", "deploy", "deploy_lm", "close_run", "end_failed_run"}
APPS = ("qa", "generation")  # the chains a run may make: question answering's, generation's


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


def generation(parent, run_name: str, common: dict) -> dsl.Output:
    """The generation chain's tasks; returns its deployment."""
    teacher = run_task(tasks.lm_teacher, parent_run_id=parent, **common).outputs["model"]
    corpus = run_task(tasks.lm_data, parent_run_id=parent, **common).outputs["corpus"]
    supernet = run_task(tasks.distill_lm, parent_run_id=parent, teacher=teacher, corpus=corpus,
                        **common).outputs["supernet"]
    latency = run_task(tasks.latency_lm, parent_run_id=parent, teacher=teacher, **common).outputs["latency_model"]
    front = run_task(tasks.search_lm, parent_run_id=parent, supernet=supernet, latency_model=latency,
                     **common).outputs["front"]
    student = run_task(tasks.finalize_lm, parent_run_id=parent, supernet=supernet, front=front,
                       **common).outputs["model"]
    records = run_task(tasks.benchmark_lm, parent_run_id=parent, model=student, **common).outputs["records"]
    return run_task(tasks.deploy_lm, parent_run_id=parent, run_name=run_name, teacher=teacher, model=student,
                    benchmark=records, **common).outputs["deployment"]


def question_answering(parent, run_name: str, latency_budgets_ms: list, common: dict) -> dsl.Output:
    """The question-answering chain's tasks; returns its deployment."""
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
    return run_task(tasks.deploy, parent_run_id=parent, run_name=run_name, teacher=teacher, model=student,
                    compiled=compiled, benchmark=records, teacher_benchmark=teacher_records, front=front,
                    **common).outputs["deployment"]


def stages(device: str, profile: str, latency_budgets_ms: list, run_name: str, overrides: dict,
           apps: tuple[str, ...] = APPS):
    """Every task of one run of `apps`' chains, in order; returns close_run, whose output is the
    run's summary."""
    common = {"profile": profile, "overrides": overrides, "device": device}
    parent = run_task(tasks.open_run, run_name=run_name, profile=profile, device=device,
                      latency_budgets_ms=latency_budgets_ms).output
    deployments = {}
    if "qa" in apps:
        deployments["deployment"] = question_answering(parent, run_name, latency_budgets_ms, common)
    if "generation" in apps:
        deployments["generation"] = generation(parent, run_name, common)
    return run_task(tasks.close_run, parent_run_id=parent, **deployments)


DESCRIPTION = ("Compress a QA transformer and a text generator for a device's latency budget, compile, benchmark "
               "and deploy them.")


def local_pipeline(apps: tuple[str, ...] = APPS):
    """The pipeline as `make run` runs it (kfp.local), making `apps`' chains: its output is the
    run's summary, which pipelines/local.py prints; a failure there ends the MLflow run FAILED from
    pipelines/local.py. `overrides`: stage -> list of `key=value` config overrides, e.g.
    {"compile": ["trials=0"]}."""

    @dsl.pipeline(name="canao-compress", description=DESCRIPTION)
    def canao_compress(device: str = "x86-1t", profile: str = "quick", latency_budgets_ms: list = [],  # noqa: B006
                       run_name: str = "canao-compress", overrides: dict = {}) -> dsl.Artifact:  # noqa: B006
        return stages(device, profile, latency_budgets_ms, run_name, overrides, apps).outputs["summary"]

    return canao_compress


@dsl.pipeline(name="canao-compress", description=DESCRIPTION)
def canao_compress_on_cluster(device: str = "x86-1t", profile: str = "quick",
                              latency_budgets_ms: list = [],  # noqa: B006
                              run_name: str = "canao-compress", overrides: dict = {}):  # noqa: B006
    """As a cluster runs it (`make pipelines`, `canao submit`): the same tasks inside an exit
    handler, so a failed task ends the MLflow run FAILED rather than RUNNING forever (kfp returns
    no pipeline output from inside one; the deployment is in MLflow and the registry)."""
    with dsl.ExitHandler(run_task(tasks.end_failed_run, run_name=run_name), name="stages"):
        stages(device, profile, latency_budgets_ms, run_name, overrides)
