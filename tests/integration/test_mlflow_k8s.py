"""MLflow started as the k8s manifest starts it answers clients that name its Service."""

import urllib.error
import urllib.request

import pytest
import yaml

from canao.config import PROJECT_ROOT
from canao.mlops import services

MANIFEST = PROJECT_ROOT / "k8s" / "base" / "mlflow.yaml"


def manifest_allowed_hosts() -> str:
    deployment = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts="))


def status(url: str, host: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("allowed", [manifest_allowed_hosts(), None], ids=["as-k8s-starts-it", "mlflow-default"])
def test_mlflow_answers_the_service_name_only_with_the_manifests_allowed_hosts(tmp_path, allowed):
    port = services.free_ports(1)[0]
    server = services.start_mlflow(tmp_path, port, allowed)
    try:
        services.wait_ready(server)
        search = f"{server['url']}/api/2.0/mlflow/experiments/search?max_results=1"
        for host in ("mlflow.canao:5000", "mlflow:5000", "mlflow.canao.svc.cluster.local:5000"):
            assert status(search, host) == (200 if allowed else 403), host
        assert status(search, "evil.example:5000") == 403
        assert status(f"{server['url']}/health", "mlflow.canao:5000") == 200  # why probes stayed green
    finally:
        services.stop(server)
