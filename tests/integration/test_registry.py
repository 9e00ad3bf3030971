"""The S3 model registry against a real SeaweedFS on 127.0.0.1: immutable versions that appear
whole, verified downloads, clear credential errors, a push that survives the store dying, and
`canao serve --model NAME@ALIAS` resolving through the MLflow Model Registry to a pulled version."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from canao.cli.main import main
from canao.mlops import services
from canao.mlops.registry import Registry, RegistryError, VersionExistsError, content_version, parse_uri, pull_cached
from tests.integration.conftest import running_services


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("services")) as state:
        yield state


def make_files(directory, count: int, size: int) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(count):
        path = directory / f"part-{i:02d}.bin"
        path.write_bytes(os.urandom(size))
        files[f"model/part-{i:02d}.bin"] = path
    return files


def test_push_pull_list_and_immutability(store, tmp_path, capsys):
    registry = Registry("canao-test")
    files = make_files(tmp_path / "src", 3, 1000)
    version = content_version(files)
    assert version == content_version(dict(reversed(files.items())))
    manifest = registry.push("qa", version, files, {"metrics": {"f1": 50.0}, "lineage": {"teacher": "t"}})
    assert manifest["uri"] == f"s3://canao-test/models/qa/{version}/"
    assert registry.versions("qa") == [version] and registry.names() == ["qa"]
    with pytest.raises(VersionExistsError, match="immutable"):
        registry.push("qa", version, files, {})

    pulled = registry.pull("qa", version, tmp_path / "pulled")
    assert pulled["metrics"] == {"f1": 50.0}
    for rel, path in files.items():
        assert (tmp_path / "pulled" / rel).read_bytes() == path.read_bytes()
    with pytest.raises(FileExistsError):
        registry.pull("qa", version, tmp_path / "pulled")

    # A stored file that no longer matches its manifest fails the download, and nothing appears.
    registry.client.put_object(Bucket="canao-test", Key=f"models/qa/{version}/model/part-00.bin", Body=b"tampered")
    with pytest.raises(RegistryError, match="sha256 differs"):
        registry.pull("qa", version, tmp_path / "again")
    assert not (tmp_path / "again").exists() and list(tmp_path.glob(".again*")) == []

    capsys.readouterr()
    assert main(["registry", "list", "--bucket", "canao-test"]) == 0
    assert json.loads(capsys.readouterr().out) == {"qa": [version]}
    assert main(["registry", "show", "qa", version, "--bucket", "canao-test"]) == 0
    assert json.loads(capsys.readouterr().out)["lineage"] == {"teacher": "t"}
    assert main(["registry", "show", "qa", "sha-none", "--bucket", "canao-test"]) == 2
    assert "no such version" in capsys.readouterr().err


@pytest.mark.parametrize("crafted", ["../../escaped.bin", "/tmp/canao-absolute.bin", "model/../../up.bin",
                                     "manifest.json"])
def test_a_crafted_manifest_is_refused_on_pull_and_nothing_is_written(store, tmp_path, crafted):
    """Whoever can write the bucket can write a version's manifest: its file names are not trusted."""
    registry = Registry("canao-crafted")
    files = make_files(tmp_path / "src", 1, 100)
    version = content_version(files)
    manifest = registry.push("qa", version, files, {})
    entry = manifest["files"].pop("model/part-00.bin")
    manifest["files"][crafted] = entry
    registry.client.put_object(Bucket="canao-crafted", Key=f"models/qa/{version}/manifest.json",
                               Body=json.dumps(manifest).encode())
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(RegistryError, match="field 'files'"):
        registry.pull("qa", version, work / "a" / "b" / "pulled")
    assert [p for p in tmp_path.rglob("*") if p.is_file() and "src" not in p.parts] == []
    assert not Path("/tmp/canao-absolute.bin").exists()
    with pytest.raises(RegistryError, match="a pushed file"):
        registry.push("qa", "v-bad", {crafted: tmp_path / "src" / "part-00.bin"}, {})


def test_wrong_credentials_are_a_clear_error_and_write_nothing(store, tmp_path, monkeypatch, capsys):
    files = make_files(tmp_path / "src", 2, 100)
    with monkeypatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(RegistryError, match="credentials were rejected"):
            Registry("canao-creds").push("qa", "v1", files, {})
        assert main(["registry", "list", "--bucket", "canao-creds"]) == 2
        assert "credentials were rejected" in capsys.readouterr().err
    buckets = Registry("canao-creds").client.list_buckets()["Buckets"]
    assert "canao-creds" not in [b["Name"] for b in buckets]


def test_the_read_only_identity_pulls_and_cannot_write(store, tmp_path, monkeypatch):
    """Serving's keys (k8s/serving uses them): a compromised server cannot rewrite the registry."""
    files = make_files(tmp_path / "src", 1, 100)
    version = content_version(files)
    Registry("canao-reader").push("qa", version, files, {})
    with monkeypatch.context() as mp:
        for key, value in services.credentials(identity="reader").items():
            mp.setenv(key, value)
        reader = Registry("canao-reader")
        reader.pull("qa", version, tmp_path / "pulled")
        assert (tmp_path / "pulled" / "model/part-00.bin").read_bytes() == files["model/part-00.bin"].read_bytes()
        with pytest.raises(RegistryError, match="access denied while"):
            reader.push("qa", "v-reader", files, {})
        with pytest.raises(RegistryError, match="access denied while"):
            reader._call("deleting", "delete_object", Bucket="canao-reader", Key=f"models/qa/{version}/manifest.json")
        with pytest.raises(RegistryError, match="access denied while"):
            Registry("canao-reader-new").push("qa", version, files, {})
    assert Registry("canao-reader").versions("qa") == [version]
    buckets = Registry("canao-reader").client.list_buckets()["Buckets"]
    assert "canao-reader-new" not in [b["Name"] for b in buckets]


def test_store_killed_during_a_push_leaves_no_version_and_a_retry_succeeds(store, tmp_path):
    registry = Registry("canao-kill")
    files = make_files(tmp_path / "src", 40, 256 * 1024)
    version = content_version(files)
    prefix = f"models/qa/{version}/"
    killed = threading.Event()

    def kill_after_first_object():
        watcher = Registry("canao-kill")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if watcher.client.list_objects_v2(Bucket="canao-kill", Prefix=prefix).get("KeyCount", 0) >= 2:
                    break
            except Exception:  # the bucket may not exist yet
                pass
            time.sleep(0.02)
        os.killpg(store["s3"]["pid"], signal.SIGKILL)
        killed.set()

    watcher = threading.Thread(target=kill_after_first_object)
    watcher.start()
    with pytest.raises(RegistryError, match="does not answer"):
        registry.push("qa", version, files, {})
    watcher.join()
    assert killed.is_set()

    # Same data directory and port: the files that made it up are there, the version is not.
    s3 = services.start_s3(services.services_dir() / "s3", store["s3"]["port"],
                          services.s3_identities(services.services_dir()))
    store["s3"].update(s3)
    services.state_file().write_text(json.dumps(store))
    services.wait_ready(s3)
    assert registry.client.list_objects_v2(Bucket="canao-kill", Prefix=prefix).get("KeyCount", 0) >= 1
    assert registry.versions("qa") == [] and not registry.has_version("qa", version)
    registry.push("qa", version, files, {})
    assert registry.versions("qa") == [version]
    registry.pull("qa", version, tmp_path / "pulled")


def deploy_inputs(root, records):
    """A tiny model, a compile artifact and benchmark records for it, as the stages write them."""
    from canao.manifest import write_manifest
    from canao.qa.config import BertShape
    from canao.qa.model import init_qa_model

    model, compiled, bench = root / "model", root / "compiled", root / "bench"
    init_qa_model("random", BertShape(num_layers=1, hidden_size=32, num_heads=2, ffn_size=64), 0).save_pretrained(model)
    write_manifest(model, "teacher", {}, {"exact_match": 10.0, "f1": 20.0})
    (compiled / "tvm").mkdir(parents=True)
    (compiled / "tvm" / "model.so").write_bytes(b"\x7fELF library")
    write_manifest(compiled, "compile", {"device": "x86-1t", "seq_len": 32, "numerics_tol": 1e-3},
                   {"numerics_max_abs_diff": {"tvm": 1e-6}}, backends={"tvm": "tvm/model.so"})
    benchmark_records(bench, records)
    return ["--model", str(model), "--compiled", str(compiled), "--benchmark", str(bench)]


def benchmark_records(bench, records) -> None:
    """A benchmark directory as the benchmark stage writes it: (backend, p50 ms, numerics) on x86-1t."""
    from canao.manifest import write_manifest

    bench.mkdir()
    (bench / "records.json").write_text(json.dumps({"records": [
        {"backend": b, "device": "x86-1t", "p50_ms": p50, "p90_ms": p50, "numerics_max_abs_diff": diff}
        for b, p50, diff in records]}))
    write_manifest(bench, "benchmark", {}, {})


def test_deploy_pushes_the_fastest_passing_backend_once(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path / "cache"))
    args = ["deploy", "--profile", "tiny", "--set", "bucket=canao-deploy",
            *deploy_inputs(tmp_path, [("tvm", 2.0, 1e-6), ("litert", 3.0, 1e-6), ("onnxruntime-int8", 1.0, 0.9),
                                      ("torch", 8.0, 0.0)])]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "d1")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == "tvm"  # int8 was faster but moved the logits by 0.9 > 0.5
    version = result["registry_uri"].rstrip("/").rsplit("/", 1)[1]
    manifest = Registry("canao-deploy").manifest("canao-qa", version)
    assert {"model/model.safetensors", "compiled/x86-1t/tvm/model.so"} <= set(manifest["files"])
    assert manifest["metrics"]["speedup_vs_litert_fp32_teacher"] == 1.5
    deployment = json.loads((tmp_path / "d1" / "deployment.json").read_text())
    assert deployment["student"]["is_teacher"] and deployment["registry_uri"] == result["registry_uri"]

    # Without the stage cache the same content is found in the registry and reused, not pushed again.
    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path / "other-cache"))
    assert main([*args, "--out", str(tmp_path / "d2")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["registry_uri"] == result["registry_uri"]
    assert Registry("canao-deploy").versions("canao-qa") == [version]


def test_deploy_refuses_when_no_backend_passes(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path / "cache"))
    args = ["deploy", "--profile", "tiny", "--set", "bucket=canao-none",
            *deploy_inputs(tmp_path, [("tvm", 2.0, 0.01)]), "--out", str(tmp_path / "d")]
    assert main(args) == 2
    assert "no measured backend passes" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_serve_pulls_name_at_alias_through_mlflow_and_serves_the_compiled_artifact(store, memorized_qa, tmp_path,
                                                                                    monkeypatch, capsys):
    from canao.apps.loadtest import spawned_server
    from canao.manifest import sha256_file
    from canao.mlops import tracking

    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CANAO_REGISTRY_CACHE", str(tmp_path / "pulled"))
    model, example = memorized_qa
    compiled, bench = tmp_path / "compiled", tmp_path / "bench"
    assert main(["compile", "--profile", "tiny", "--model", str(model), "--device", "x86-1t", "--seq-len", "128",
                 "--set", f"tuning_dir={tmp_path / 'tuning'}", "--out", str(compiled)]) == 0
    benchmark_records(bench, [("tvm", 2.0, 1e-6)])
    run_id = tracking.start_pipeline_run("serve-by-alias", {"device": "x86-1t", "profile": "tiny"}, {})
    capsys.readouterr()
    assert main(["deploy", "--profile", "tiny", "--set", "bucket=canao-serve", "--model", str(model),
                 "--compiled", str(compiled), "--benchmark", str(bench), "--mlflow-run", run_id,
                 "--out", str(tmp_path / "deployment")]) == 0
    uri = json.loads(capsys.readouterr().out.splitlines()[-1])["registry_uri"]
    bucket, name, version = parse_uri(uri)
    assert (bucket, name) == ("canao-serve", "canao-qa")

    with spawned_server("canao-qa@tiny", "tiny", ["device=x86-1t"]) as url:
        info = httpx.get(f"{url}/v1/info", timeout=10).json()["models"]["qa"]
        answer = httpx.post(f"{url}/v1/qa", json={"context": example.context, "question": example.question},
                            timeout=30).json()
    assert info["name"] == "canao-qa@tiny" and info["stage"] == "compile" and info["device"] == "x86-1t"
    assert info["version"] == sha256_file(compiled / "manifest.json")[:12]  # the deployed artifact, pulled whole
    assert answer["answer"] == example.answers[0].text

    # The pulled copy is reused while intact; one that changed is pulled again.
    pulled = tmp_path / "pulled" / bucket / name / version
    weights = pulled / "model" / "model.safetensors"
    assert pull_cached(uri, tmp_path / "pulled") == pulled
    weights.write_bytes(b"not the weights")
    assert pull_cached(uri, tmp_path / "pulled") == pulled
    assert sha256_file(weights) == sha256_file(model / "model.safetensors")

    # A worse deploy registers its version but leaves the alias where it was.
    assert main(["deploy", "--profile", "tiny", "--set", "bucket=canao-serve", "--set", "max_p50_ms=1",
                 "--model", str(model), "--compiled", str(compiled), "--benchmark", str(bench),
                 "--mlflow-run", run_id, "--out", str(tmp_path / "refused")]) == 0
    refused = json.loads((tmp_path / "refused" / "deployment.json").read_text())["mlflow_model"]
    assert not refused["promoted"] and "p50 2.00 ms is over the deploy config's max_p50_ms 1" in refused["reason"]
    assert tracking.model_source("canao-qa", "tiny") == uri

    # An alias nobody set: the server answers /healthz meanwhile, then gives up within resolve_timeout_s
    # (tiny: 6 s), naming the reference.
    code, log = serve_unresolvable("canao-qa@staging", os.environ["MLFLOW_TRACKING_URI"])
    assert code == 1 and "--model canao-qa@staging: not resolved within resolve_timeout_s (6 s)" in log
    assert "no version of registered model 'canao-qa' has alias 'staging'" in log
    # A reference that is not one is refused before the server binds.
    assert main(["serve", "--profile", "tiny", "--model", "no-such-dir"]) == 2
    assert "--model no-such-dir: neither a directory nor a registry reference NAME@ALIAS" in capsys.readouterr().err


def serve_unresolvable(ref: str, mlflow_uri: str) -> tuple[int, str]:
    """`canao serve --model ref` (tiny) against `mlflow_uri`: it must bind and answer /healthz (not
    /readyz) while it tries to resolve `ref`, then stop within resolve_timeout_s; (exit status, log)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "canao.cli.main", "serve", "--profile", "tiny", "--model", ref,
                               "--set", f"port={port}"], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri})
    try:
        answered = None
        while answered is None and server.poll() is None:  # until it answers (imports take a while) or stops
            try:
                answered = (httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code,
                            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code)
            except httpx.HTTPError:
                time.sleep(0.2)
        bound = time.monotonic()
        assert answered == (200, 503)  # bound and alive, not ready
        code = server.wait(timeout=30)
        assert time.monotonic() - bound < 6 + 5  # gave up within resolve_timeout_s (and a few s to stop)
        return code, server.stderr.read()
    finally:
        server.kill()


def test_serve_binds_and_gives_up_when_mlflow_is_down(tmp_path):
    dead = socket_port_nobody_listens_on()
    code, log = serve_unresolvable("canao-qa@production", f"http://127.0.0.1:{dead}")
    assert code == 1 and "not resolved within resolve_timeout_s (6 s)" in log and f"127.0.0.1:{dead}" in log


def socket_port_nobody_listens_on() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_alias_moves_only_to_a_version_that_passes_the_gate_and_beats_its_holder(store, monkeypatch):
    from canao.mlops import tracking

    run_id = tracking.start_pipeline_run("promotion", {"device": "x86-1t", "profile": "tiny"}, {})
    gate = tracking.Gate("f1", 30.0, "p50_ms", 10.0)

    def deploy(source: str, f1: float, ms: float) -> dict:
        return tracking.register_model("gated", f"s3://b/models/gated/{source}/", run_id, "live", {},
                                       {"f1": f1, "p50_ms": ms}, gate)

    first = deploy("v1", 50.0, 5.0)
    assert first["promoted"] and first["previous"] is None
    for source, f1, ms, why in (("v2", 40.0, 5.0, "below the F1 50.00 of version 1, which the alias holds"),
                                ("v3", 20.0, 5.0, "below the deploy config's min_f1 30"),
                                ("v4", 60.0, 12.0, "over the deploy config's max_p50_ms 10")):
        refused = deploy(source, f1, ms)
        assert not refused["promoted"] and why in refused["reason"] and refused["previous"] == first["version"]
        assert tracking.model_source("gated", "live") == "s3://b/models/gated/v1/"
    better = deploy("v5", 60.0, 5.0)
    assert better["promoted"] and better["previous"] == first["version"]
    assert tracking.model_source("gated", "live") == "s3://b/models/gated/v5/"

    # The compare-and-set runs under a lock: while another deploy holds it, nothing moves.
    tracking.client().create_registered_model("gated.live.promotion-lock")
    with pytest.raises(tracking.TrackingError, match="another deploy holds the promotion lock 'gated.live.promotion"):
        deploy("v6", 70.0, 5.0)
    assert tracking.model_source("gated", "live") == "s3://b/models/gated/v5/"
    monkeypatch.setattr(tracking, "STALE_LOCK_SECONDS", 0)  # ...unless that deploy died holding it
    assert deploy("v7", 70.0, 5.0)["promoted"] and tracking.model_source("gated", "live") == "s3://b/models/gated/v7/"


def test_a_perplexity_gate_moves_the_alias_only_to_a_lower_perplexity(store):
    """Generation's gate: lower is better, bounded by max_perplexity and max_ms_per_token."""
    from canao.mlops import tracking

    run_id = tracking.start_pipeline_run("lm-promotion", {"device": "x86-1t", "profile": "tiny"}, {})
    gate = tracking.Gate("perplexity", 40.0, "ms_per_token", 20.0)

    def deploy(source: str, perplexity: float, ms: float) -> dict:
        return tracking.register_model("gated-lm", f"s3://b/models/gated-lm/{source}/", run_id, "live", {},
                                       {"perplexity": perplexity, "ms_per_token": ms}, gate)

    assert deploy("v1", 30.0, 10.0)["promoted"]
    for source, perplexity, ms, why in (
            ("v2", 35.0, 10.0, "perplexity 35.00 is above the perplexity 30.00 of version 1"),
            ("v3", 50.0, 10.0, "above the deploy config's max_perplexity 40"),
            ("v4", 20.0, 25.0, "25.00 ms per token is over the deploy config's max_ms_per_token 20")):
        refused = deploy(source, perplexity, ms)
        assert not refused["promoted"] and why in refused["reason"]
    assert deploy("v5", 25.0, 10.0)["promoted"]
    assert tracking.model_source("gated-lm", "live") == "s3://b/models/gated-lm/v5/"
    with pytest.raises(ValueError, match="Gate: quality must be one of f1, perplexity"):
        tracking.Gate("bleu", 0.0, "ms_per_token", 0.0)


def test_the_exit_handler_ends_a_failed_pipelines_run_failed_and_leaves_a_succeeded_one(store):
    from canao.mlops import tracking
    from components.runtime import end_failed_run

    failed = tracking.start_pipeline_run("exit-failed", {"pipeline_run": "exit-failed"}, {})
    succeeded = tracking.start_pipeline_run("exit-succeeded", {"pipeline_run": "exit-succeeded"}, {})
    end_failed_run("exit-failed", "FAILED")
    end_failed_run("exit-succeeded", "SUCCEEDED")
    end_failed_run("never-opened", "FAILED")  # a run that failed before opening its MLflow run: nothing to end
    assert tracking.client().get_run(failed).info.status == "FAILED"
    assert tracking.client().get_run(succeeded).info.status == "RUNNING"  # close_run ends it FINISHED
