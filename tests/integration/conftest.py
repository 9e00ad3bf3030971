import contextlib
import socket

import pytest
import yaml

from canao import device_lab


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
            yield device_lab.up(port=free_port(), timeout=120)
        finally:
            device_lab.down()


@contextlib.contextmanager
def running_services(directory):
    """The embedded MLflow server and SeaweedFS S3 store on free ports of 127.0.0.1, state in
    `directory`, their client environment set; stopped on exit whatever happens."""
    from canao import services

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
