"""k8s/serving: the Deployment runs a `canao serve` command the CLI accepts, probes /readyz and
/healthz on the port it serves, and takes registry credentials from Secrets only."""

import shutil
import subprocess

import pytest
import yaml

from canao.cli.main import build_parser
from canao.config import PROJECT_ROOT
from canao.profiles import load_config
from components.image import SERVING_IMAGE

SERVING = PROJECT_ROOT / "k8s" / "serving"


def manifests() -> dict[str, dict]:
    kustomization = yaml.safe_load((SERVING / "kustomization.yaml").read_text())
    documents = [d for name in kustomization["resources"] for d in yaml.safe_load_all((SERVING / name).read_text())]
    return {d["kind"]: d for d in documents}


def configmap_values() -> dict[str, str]:
    kustomization = yaml.safe_load((SERVING / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    return dict(literal.split("=", 1) for literal in generator["literals"])


def test_the_deployment_serves_with_probes_on_its_port_and_secrets_by_reference():
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == SERVING_IMAGE.split(":")[0]  # the serving image; kustomize sets the tag
    (image,) = yaml.safe_load((SERVING / "kustomization.yaml").read_text())["images"]
    assert f"{image['name']}:{image['newTag']}" == SERVING_IMAGE
    command = container["command"]
    for name, value in configmap_values().items():  # Kubernetes expands $(NAME) from the container's env
        from_configmap = {"configMapKeyRef": {"name": "canao-serving", "key": name}}
        assert {"name": name, "valueFrom": from_configmap} in container["env"]
        command = [arg.replace(f"$({name})", value) for arg in command]
    assert command[:2] == ["canao", "serve"] and "$(" not in " ".join(command)
    args = build_parser().parse_args(command[1:])
    assert (args.model, args.lm_model) == ("canao-qa@production", "")  # no generation model deployed yet
    cfg = load_config("serve", args.profile, None, [*args.overrides, f"host={args.host}", f"port={args.port}"])
    assert container["ports"] == [{"name": "http", "containerPort": cfg.port}]
    # The probes send a Host the server answers (the kubelet's default is the pod's IP, which it refuses).
    host = [{"name": "Host", "value": "serving"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "httpHeaders": host}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "httpHeaders": host}
    assert container["startupProbe"]["httpGet"]["httpHeaders"] == host
    assert {"serving", "serving.canao.svc.cluster.local"} <= set(cfg.allowed_hosts)
    # The root filesystem is read-only: registry models are pulled into the writable emptyDir.
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert any(cfg.registry_cache.startswith(m["mountPath"] + "/") for m in container["volumeMounts"])
    assert cfg.threads == int(container["resources"]["limits"]["cpu"])  # not the node's core count
    assert {s["secretRef"]["name"] for s in container["envFrom"]} == {"canao-s3-reader", "canao-pipeline"}
    assert all("value" not in e or "KEY" not in e["name"] for e in container["env"])  # no credential in the file
    assert manifests()["Service"]["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders kustomize directories")
def test_kustomize_renders_the_directory():
    rendered = subprocess.run(["kubectl", "kustomize", str(SERVING)], capture_output=True, text=True, check=True)
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered.stdout)]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Service"]
