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
CONFIG_ENV = {"CANAO_TRACKER": "CANAO_TRACKER"}
DATA_PVC = "canao-data"
DATA_MOUNT = "/shared"


def on_cluster(task: dsl.PipelineTask) -> dsl.PipelineTask:
    for secret, keys in SECRETS.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={key: key for key in keys})
    kubernetes.use_config_map_as_env(task, config_map_name=CONFIG_MAP, config_map_key_to_env=CONFIG_ENV)
    kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)
    return task


def compile_and_benchmark(model, parent, common: dict) -> tuple:
    """The tasks that compile `model` for the device and time it there: (compiled, records)."""
    compiled = on_cluster(tasks.compile_model(parent_run_id=parent, model=model, **common)).outputs["compiled"]
    measured = on_cluster(tasks.benchmark(parent_run_id=parent, model=model, compiled=compiled, **common))
    return compiled, measured.outputs["records"]


@dsl.pipeline(name="canao-compress",
              description="Compress a QA transformer for a device's latency budget, compile, benchmark and deploy it.")
def canao_compress(device: str = "x86-1t", profile: str = "quick", latency_budgets_ms: list = [10.0, 25.0],  # noqa: B006
                   run_name: str = "canao-compress", overrides: dict = {}) -> dsl.Artifact:  # noqa: B006
    """`overrides`: stage -> list of `key=value` config overrides, e.g. {"compile": ["trials=0"]}."""
    common = {"profile": profile, "overrides": overrides, "device": device}
    run = on_cluster(tasks.open_run(run_name=run_name, profile=profile, device=device,
                                     latency_budgets_ms=latency_budgets_ms))
    parent = run.output
    teacher = on_cluster(tasks.teacher(parent_run_id=parent, **common)).outputs["model"]
    supernet = on_cluster(tasks.distill(parent_run_id=parent, teacher=teacher, **common)).outputs["supernet"]
    latency = on_cluster(tasks.latency(parent_run_id=parent, teacher=teacher, **common)).outputs["latency_model"]
    front = on_cluster(tasks.search(parent_run_id=parent, latency_budgets_ms=latency_budgets_ms, supernet=supernet,
                                     latency_model=latency, **common)).outputs["front"]
    finalize = on_cluster(tasks.finalize(parent_run_id=parent, teacher=teacher, supernet=supernet, front=front,
                                          **common))
    student = finalize.outputs["model"]
    compiled, records = compile_and_benchmark(student, parent, common)
    _, teacher_records = compile_and_benchmark(teacher, parent, common)
    deployed = on_cluster(tasks.deploy(
        parent_run_id=parent, run_name=run_name, teacher=teacher, model=student, compiled=compiled,
        benchmark=records, teacher_benchmark=teacher_records, front=front, **common))
    on_cluster(tasks.close_run(parent_run_id=parent, deployment=deployed.outputs["deployment"]))
    return deployed.outputs["deployment"]
