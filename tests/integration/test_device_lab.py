"""The device lab on real TVM RPC processes: a tracker and servers on 127.0.0.1.

One lab for the module (starting it costs ~15 s on two busy cores): the project's
`x86-1t` plus `x86-1t-pair`, the same device with two servers, which the failover test
kills one by one. The lab is stopped last by the `down` test, and by the fixture anyway.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from canao.lab import devices, rpc
from canao.lab.devices import DeviceLabError, get_device, load_devices, tvm_target
from canao.lab.rpc import run_remote, time_remote
from tests.integration.conftest import free_port, live_processes, running_lab

PAIR = "x86-1t-pair"


def _live_processes(groups: set[int]) -> list[int]:
    """Pids of live (non-zombie) processes in the given process groups."""
    return [pid for pid, (group, _) in live_processes().items() if group in groups]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    project = yaml.safe_load(devices.devices_file(devices.DEVICES_FILE).read_text())
    profiles = {"x86-1t": project["x86-1t"], PAIR: {**project["x86-1t"], "servers": 2}}
    with running_lab(tmp_path_factory.mktemp("device_lab"), profiles) as state:
        yield state


@pytest.fixture(scope="module")
def matmul_relu(lab, tmp_path_factory):
    """relu(x @ w) for x86-1t, exported as a shared library, with inputs and the numpy reference."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    builder = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((64, 256), "float32"))
    w = relax.Var("w", R.Tensor((256, 256), "float32"))
    with builder.function("main", [x, w]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.nn.relu(relax.op.matmul(x, w)))
        builder.emit_func_output(out)
    path = tmp_path_factory.mktemp("lib") / "matmul_relu.so"
    tvm.compile(builder.get(), target=tvm_target(get_device("x86-1t"))).export_library(str(path))
    rng = np.random.default_rng(0)
    inputs = [rng.uniform(-1, 1, (64, 256)).astype("float32"), rng.uniform(-1, 1, (256, 256)).astype("float32")]
    return path, inputs, np.maximum(inputs[0] @ inputs[1], 0)


def test_project_devices_are_valid_tvm_targets():
    profiles = load_devices(devices.DEVICES_FILE)
    assert {"x86-1t", "x86-2t", "aarch64-linux"} <= set(profiles)
    for device in profiles.values():
        target = tvm_target(device)
        assert target.attrs["num-cores"] == device.threads
    assert str(tvm_target(profiles["x86-1t"]).attrs["mcpu"]) != "host"
    assert str(tvm_target(profiles["aarch64-linux"]).attrs["mtriple"]) == "aarch64-linux-gnu"
    assert profiles["x86-2t"].cores == (0, 1) and profiles["x86-2t"].local
    assert not profiles["aarch64-linux"].local


def test_unknown_key_lists_the_known_keys(monkeypatch):
    monkeypatch.delenv("CANAO_DEVICES", raising=False)
    with pytest.raises(DeviceLabError, match=r"'x86-9t': unknown \(known: x86-1t, x86-2t, aarch64-linux"):
        get_device("x86-9t")


def test_invalid_device_file_names_file_key_and_field(tmp_path):
    path = tmp_path / "devices.yaml"
    path.write_text("phone:\n  target: {kind: llvm}\n  threads: two\n  description: x\n  local: false\n")
    with pytest.raises(DeviceLabError, match=f"{path}: phone.threads: expected int, got 'two'"):
        load_devices(path)


def test_tracker_not_running_says_how_to_start_it(monkeypatch, tmp_path):
    monkeypatch.setenv("CANAO_LAB_DIR", str(tmp_path))
    monkeypatch.delenv("CANAO_TRACKER", raising=False)
    with pytest.raises(DeviceLabError, match="device lab not running: start it with `canao device-lab up`"):
        rpc.status()
    monkeypatch.setenv("CANAO_TRACKER", f"127.0.0.1:{free_port()}")
    with pytest.raises(DeviceLabError, match="start it with `canao device-lab up`.*does not answer"):
        rpc.tracker_address()


def test_up_on_a_port_in_use_names_the_port(monkeypatch, tmp_path):
    monkeypatch.setenv("CANAO_LAB_DIR", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DeviceLabError, match=f"port: 127.0.0.1:{port} is already in use"):
            rpc.up(port=port)
    assert rpc.read_state() is None


def test_pin_sets_affinity_and_thread_env():
    code = ("import os; from canao.lab.devices import get_device, pin; pin(get_device('x86-1t')); "
            "print(sorted(os.sched_getaffinity(0)), os.environ['TVM_NUM_THREADS'], os.environ['OMP_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k != "CANAO_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["[0]", "1", "1"]


def test_servers_are_registered_pinned_and_threaded(lab):
    assert {k: len(v["servers"]) for k, v in rpc.status()["devices"].items()} == {"x86-1t": 1, PAIR: 2}
    for server in lab["servers"]:
        status = Path(f"/proc/{server['pid']}/status").read_text()
        assert "Cpus_allowed_list:\t0\n" in status
        environ = Path(f"/proc/{server['pid']}/environ").read_bytes().split(b"\0")
        assert b"TVM_NUM_THREADS=1" in environ and b"OMP_NUM_THREADS=1" in environ


def test_up_when_up_returns_the_running_lab(lab):
    assert rpc.up() == lab


def test_cli_prints_the_status_as_json(lab, capsys):
    parser = argparse.ArgumentParser()
    rpc.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["device-lab", "status"])
    args.func(args)
    status = json.loads(capsys.readouterr().out)
    assert status["tracker"] == f"127.0.0.1:{lab['tracker']['port']}"
    assert len(status["devices"][PAIR]["servers"]) == 2


def test_run_and_time_on_the_device(matmul_relu):
    path, inputs, expected = matmul_relu
    (out,) = run_remote(path, inputs, "x86-1t")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    times = time_remote(path, inputs, "x86-1t", warmup=2, runs=5)
    assert len(times) == 5 and all(isinstance(t, float) and t > 0 for t in times)


def test_an_error_of_the_model_is_not_retried(matmul_relu):
    path, inputs, _ = matmul_relu
    with pytest.raises(DeviceLabError, match="device x86-1t: .*"):
        run_remote(path, [inputs[0][:8], inputs[1]], "x86-1t")
    assert len(rpc.status()["devices"]["x86-1t"]["servers"]) == 1


def test_time_remote_moves_to_another_server_when_one_dies(lab, matmul_relu):
    path, inputs, _ = matmul_relu
    pair = [s for s in lab["servers"] if s["key"] == PAIR]
    killed = []
    returned = threading.Event()

    def kill_the_serving_one():
        deadline = time.monotonic() + 30
        while not returned.is_set() and time.monotonic() < deadline:
            for server in pair:
                if "start serving" in Path(server["log"]).read_text():
                    os.killpg(server["pid"], signal.SIGKILL)
                    killed.append(server)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_serving_one)
    killer.start()
    times = time_remote(path, inputs, PAIR, warmup=1, runs=300)
    returned.set()
    killer.join()
    assert len(killed) == 1, "no server of the pair was killed during the call"
    assert len(times) == 300 and all(t > 0 for t in times)

    (survivor,) = [s for s in pair if s is not killed[0]]
    os.killpg(survivor["pid"], signal.SIGKILL)
    with pytest.raises(DeviceLabError, match=f"device {PAIR}: "):
        time_remote(path, inputs, PAIR, warmup=0, runs=3)


def test_down_leaves_no_process_running(lab):
    groups = {s["pid"] for s in lab["servers"]} | {lab["tracker"]["pid"]}
    assert _live_processes(groups)  # the x86-1t server and the tracker, at least
    stopped = rpc.down()
    assert set(stopped["stopped"]) == groups
    assert _live_processes(groups) == []
    assert not rpc.state_file().exists()
    with pytest.raises(DeviceLabError, match="device lab not running"):
        rpc.status()
