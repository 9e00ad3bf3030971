import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from canao.lab import rpc


def live_processes() -> dict[int, tuple[int, str]]:
    """pid -> (process group, command line) of every live (not zombie) process on this machine."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state, _, group = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if state != "Z":
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found[int(proc.name)] = (int(group), command)
        except OSError:
            continue  # exited while we looked
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_lab(directory, devices: dict):
    """A device lab of `devices` (key -> profile) on 127.0.0.1 with its state in `directory`,
    stopped on exit whatever happens."""
    devices_path = directory / "devices.yaml"
    devices_path.write_text(yaml.safe_dump(devices))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CANAO_DEVICES", str(devices_path))
        mp.setenv("CANAO_LAB_DIR", str(directory / "state"))
        mp.delenv("CANAO_TRACKER", raising=False)
        try:
            yield rpc.up(port=free_port(), timeout=120)
        finally:
            rpc.down()


@contextlib.contextmanager
def running_services(directory):
    """The embedded MLflow server and SeaweedFS S3 store on free ports of 127.0.0.1, state in
    `directory`, their client environment set; stopped on exit whatever happens."""
    from canao.mlops import services

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CANAO_SERVICES_DIR", str(directory))
        mlflow_port, s3_port = services.free_ports(2)
        state = services.up(mlflow_port, s3_port)
        try:
            for key, value in services.env(state).items():
                mp.setenv(key, value)
            yield state
        finally:
            services.down()


@contextlib.contextmanager
def running_server(service):
    """`canao serve`'s app for `service` on a free loopback port, in a thread, until the block ends:
    its URL once ready."""
    from canao.apps.serve import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
