"""The device lab at run time: an Apache TVM RPC tracker and the RPC servers of the device
profiles (canao.lab.devices), and running an exported Relax executable on a device.

`up()` starts a tracker on this machine and, for every local profile, RPC servers pinned
to the profile's cores; phones and boards join the same tracker with their own
`tvm.exec.rpc_server` (device_lab/README.md). `time_remote` and `run_remote` run an
exported Relax executable on a server of a key, whichever machine it is on, so a number
measured for a key means "on that device".

The lab's state (tracker address, pids, ports, logs) is a JSON file under
`outputs/device_lab/` (env CANAO_LAB_DIR), so `status()` and `down()` work from any
process. TVM is imported inside the functions that need it: importing this module is cheap.
"""

from __future__ import annotations

import gc
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from canao.config import resolve_path
from canao.lab.devices import Device, DeviceLabError, _check_cores, get_device, load_devices, runtime_env
from canao.manifest import write_text_atomic
from canao.processes import group_processes, spawn_session, stop_groups

LAB_DIR = "outputs/device_lab"  # state file and logs, relative to the project root; env CANAO_LAB_DIR overrides
STATE_FILE_NAME = "lab.json"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9190  # TVM's customary tracker port
NOT_RUNNING = "device lab not running: start it with `canao device-lab up`"
T = TypeVar("T")


# Popen handles of the processes `up` started in this process, so that a `down` in the same
# process reaps them instead of leaving zombies behind.
_children: dict[int, subprocess.Popen] = {}


def lab_dir() -> Path:
    return resolve_path(os.environ.get("CANAO_LAB_DIR") or LAB_DIR)


def state_file() -> Path:
    return lab_dir() / STATE_FILE_NAME


def read_state() -> dict | None:
    """The running lab's state (tracker and servers: pid, port, log), or None if none was started."""
    file = state_file()
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise DeviceLabError(f"{file}: not valid JSON ({e}); stop the processes it lists and remove it") from None


def up(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, devices_path: str | os.PathLike | None = None,
       timeout: float = 180.0) -> dict:
    """Start the tracker on host:port and the RPC servers of every local device; return the lab's state.

    Returns once every server has registered with the tracker; on failure stops what it
    started and raises DeviceLabError with the log tail of the process that failed.
    """
    state = read_state()
    if state is not None:
        if _answers(_address(state)):
            print(f"device lab already up: tracker {_format(_address(state))} ({state_file()})", file=sys.stderr)
            return state
        _stop_all(state)  # what is left of a lab whose tracker died
        state_file().unlink()
    devices = [d for d in load_devices(devices_path).values() if d.local]
    for device in devices:
        _check_cores(device)
    if _answers((host, port)):
        raise DeviceLabError(f"port: {host}:{port} is already in use; choose another with --port")
    directory = lab_dir()
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    state = {"tracker": {}, "servers": []}
    try:
        state["tracker"] = _start_tracker(host, port, directory)
        _wait_answering(state["tracker"], deadline)
        for device in devices:
            for index in range(device.servers):
                state["servers"].append(_start_server(device, index, (host, port), directory))
        _wait_registered(state, deadline)
    except BaseException:
        _stop_all(state)
        raise
    write_text_atomic(state_file(), json.dumps(state, indent=1))
    return state


def status() -> dict:
    """Tracker address and, per key, the servers registered with it and how many are free."""
    address = tracker_address()
    summary = _tracker_summary(address)
    devices: dict[str, dict] = {}
    for key, queue in sorted(summary["queue_info"].items()):
        devices[key] = {"servers": [], "free": queue["free"], "pending": queue["pending"]}
    for server in summary["server_info"]:
        key = server["key"].removeprefix("server:")
        entry = devices.setdefault(key, {"servers": [], "free": 0, "pending": 0})
        entry["servers"].append(_format(tuple(server["addr"])))
    return {"tracker": _format(address), "devices": devices}


def down() -> dict:
    """Stop every process `up` started (SIGTERM, then SIGKILL) and remove the state file."""
    state = read_state()
    if state is None:
        return {"stopped": []}
    stopped = _stop_all(state)
    state_file().unlink()
    return {"stopped": stopped}


def tracker_address() -> tuple[str, int]:
    """The tracker to use: env CANAO_TRACKER=host:port, else the running lab's; it must answer."""
    configured = os.environ.get("CANAO_TRACKER")
    if configured:
        host, _, port = configured.rpartition(":")
        if not host or not port.isdigit():
            raise DeviceLabError(f"CANAO_TRACKER: expected host:port, got {configured!r}")
        address, source = (host, int(port)), "CANAO_TRACKER"
    else:
        state = read_state()
        if state is None:
            raise DeviceLabError(NOT_RUNNING)
        address, source = _address(state), str(state_file())
    if not _answers(address):
        raise DeviceLabError(f"{NOT_RUNNING} (the tracker at {_format(address)}, from {source}, does not answer)")
    return address


def _address(state: dict) -> tuple[str, int]:
    return state["tracker"]["host"], state["tracker"]["port"]


def _format(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _answers(address: tuple[str, int], timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def _spawn(command: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    # A session of its own: the server's workers share its process group, and an interrupt
    # of the shell that ran `up` does not reach the lab.
    process = spawn_session(command, log, env)
    _children[process.pid] = process
    return process.pid


def _start_tracker(host: str, port: int, directory: Path) -> dict:
    log = directory / "tracker.log"
    # --port-end port+1: bind exactly that port, never a neighbour the clients do not know.
    pid = _spawn([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
                  "--port-end", str(port + 1)], log)
    return {"host": host, "port": port, "pid": pid, "log": str(log)}


def _wait_answering(tracker: dict, deadline: float) -> None:
    address = (tracker["host"], tracker["port"])
    while not _answers(address, timeout=0.5):
        if _children[tracker["pid"]].poll() is not None:
            raise DeviceLabError(f"tracker on {_format(address)} exited at start-up; {_tail(Path(tracker['log']))}")
        if time.monotonic() > deadline:
            raise DeviceLabError(f"tracker on {_format(address)} not answering at start-up; "
                                 f"{_tail(Path(tracker['log']))}")
        time.sleep(0.1)


def _start_server(device: Device, index: int, tracker: tuple[str, int], directory: Path) -> dict:
    port = _free_port()
    log = directory / f"server-{device.key}-{index}.log"
    command = ["taskset", "-c", ",".join(map(str, device.cores)), sys.executable, "-m", "tvm.exec.rpc_server",
               "--tracker", _format(tracker), "--key", device.key,
               "--host", DEFAULT_HOST, "--port", str(port), "--port-end", str(port + 1),
               # what the tracker hands to clients: the address the server binds, whichever
               # address it reached the tracker from
               "--custom-addr", DEFAULT_HOST]
    pid = _spawn(command, log, env={**os.environ, **runtime_env(device)})
    return {"key": device.key, "host": DEFAULT_HOST, "port": port, "pid": pid, "log": str(log)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((DEFAULT_HOST, 0))
        return sock.getsockname()[1]


def _wait_registered(state: dict, deadline: float) -> None:
    address = _address(state)
    while True:
        for process in [state["tracker"], *state["servers"]]:
            if _children[process["pid"]].poll() is not None:
                name = f"RPC server {process['key']}" if "key" in process else "tracker"
                raise DeviceLabError(f"{name} (pid {process['pid']}) exited at start-up; {_tail(Path(process['log']))}")
        registered = {tuple(s["addr"]) for s in _tracker_summary(address)["server_info"]}
        missing = [s for s in state["servers"] if (s["host"], s["port"]) not in registered]
        if not missing:
            return
        if time.monotonic() > deadline:
            first = missing[0]
            raise DeviceLabError(f"{len(missing)} RPC server(s) not registered with the tracker in time "
                                 f"({', '.join(s['key'] for s in missing)}); {_tail(Path(first['log']))}")
        time.sleep(0.2)


def _tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"no log at {log}"
    return f"last lines of {log}:\n" + "\n".join(text)


def _stop_all(state: dict) -> list[int]:
    """Stop the lab's process groups (each server or tracker with its workers); return the leaders' pids."""
    leaders = [s["pid"] for s in state["servers"]] + ([state["tracker"]["pid"]] if state["tracker"] else [])
    # Only groups that hold a TVM RPC process now: a pid reused since the lab started is never signalled.
    groups = set(group_processes(set(leaders), command_contains=b"tvm.exec."))
    survivors = stop_groups(groups, grace_s=5.0)
    if survivors:
        raise DeviceLabError(f"device lab: processes {survivors} survived SIGKILL")
    for leader in leaders:
        _children.pop(leader, None)
    return leaders


def time_remote(lib_path: str | os.PathLike, inputs: list, device_key: str, warmup: int = 3, runs: int = 10,
                func: str = "main", request_timeout: float = 60.0, session_timeout: float = 600.0) -> list[float]:
    """Per-run latency in ms of `func` of an exported Relax executable on a server of `device_key`.

    `warmup` untimed calls, then `runs` timed calls (TVM's time_evaluator, number=1), on the
    inputs copied to the device once. A server that dies mid-run is replaced by another of
    the same key; the result is always complete.
    """
    if warmup < 0:
        raise DeviceLabError(f"warmup: must be >= 0, got {warmup}")
    if runs < 1:
        raise DeviceLabError(f"runs: must be >= 1, got {runs}")

    def measure(session) -> list[float]:
        import tvm

        vm, device = _remote_vm(session, Path(lib_path))
        vm.set_input(func, *[tvm.runtime.tensor(x, device) for x in inputs])
        for _ in range(warmup):
            vm.invoke_stateful(func)
        # Timing `invoke_stateful` rather than `func` itself: a VM function that returns a
        # tuple cannot be timed over RPC.
        result = vm.time_evaluator("invoke_stateful", device, number=1, repeat=runs)(func)
        if len(result.results) != runs:
            raise DeviceLabError(f"device {device_key}: {len(result.results)} timings for {runs} runs")
        return [seconds * 1000 for seconds in result.results]

    return _on_device(device_key, lib_path, measure, request_timeout, session_timeout)


def run_remote(lib_path: str | os.PathLike, inputs: list, device_key: str, func: str = "main",
               request_timeout: float = 60.0, session_timeout: float = 600.0) -> list:
    """One call of `func` on a server of `device_key`; its outputs (tuples flattened) as numpy arrays."""

    def run(session) -> list:
        import tvm

        vm, device = _remote_vm(session, Path(lib_path))
        vm.set_input(func, *[tvm.runtime.tensor(x, device) for x in inputs])
        vm.invoke_stateful(func)
        return _flatten(vm.get_outputs(func))

    return _on_device(device_key, lib_path, run, request_timeout, session_timeout)


def _flatten(value) -> list:
    if isinstance(value, tuple):
        return [array for item in value for array in _flatten(item)]
    return [value.numpy()]


def _remote_vm(session, lib_path: Path):
    from tvm import relax

    session.upload(str(lib_path))
    device = session.cpu()
    return relax.VirtualMachine(session.load_module(lib_path.name), device), device


def _on_device(device_key: str, lib_path: str | os.PathLike, work: Callable[[Any], T], request_timeout: float,
               session_timeout: float) -> T:
    """`work(session)` on a server of the key; when the server is lost, again on another one."""
    get_device(device_key)  # an unknown key fails here, listing the known ones
    if not Path(lib_path).is_file():
        raise DeviceLabError(f"lib_path: {lib_path}: no such file (write it with executable.export_library)")
    address = tracker_address()
    registered = _registered(address, device_key)
    if not registered:
        raise DeviceLabError(f"device {device_key}: no RPC server registered with the tracker at {_format(address)} "
                             "(`canao device-lab status` lists them; device_lab/README.md says how a device joins)")
    lost: list[str] = []
    for _ in range(1 + max(1, len(registered))):
        try:
            session = _request_session(address, device_key, request_timeout, session_timeout)
        except (RuntimeError, OSError) as e:  # the server left between the tracker's answer and our connect
            lost.append(str(e))
            continue
        if session is None:
            break
        try:
            return work(session)
        except (RuntimeError, OSError) as e:  # TVM's errors are RuntimeErrors
            if _session_alive(session):
                raise DeviceLabError(f"device {device_key}: {e}") from e
            lost.append(str(e).strip().splitlines()[-1])
        finally:
            # The Relax VM keeps its module, and so the session, in reference cycles: collect
            # them now, so the server is free for the next request rather than whenever the GC runs.
            del session
            gc.collect()
    raise DeviceLabError(f"device {device_key}: lost {len(lost)} RPC server session(s) and no server of the key "
                         f"is left to finish the work; last error: {lost[-1] if lost else 'none'}")


def _session_alive(session) -> bool:
    try:
        session.get_function("runtime.NumThreads")()
        return True
    except (RuntimeError, OSError):
        return False


def _registered(address: tuple[str, int], device_key: str) -> list[str]:
    summary = _tracker_summary(address)
    return [_format(tuple(s["addr"])) for s in summary["server_info"] if s["key"] == f"server:{device_key}"]


def _tracker_summary(address: tuple[str, int]) -> dict:
    from tvm.rpc.base import TrackerCode, sendjson

    try:
        with _connect_tracker(address) as sock:
            sendjson(sock, [TrackerCode.SUMMARY])
            return _reply(sock, address)
    except OSError as e:
        raise DeviceLabError(f"tracker {_format(address)}: no summary ({e}); {NOT_RUNNING}") from None


def _request_session(address: tuple[str, int], device_key: str, timeout: float, session_timeout: float):
    """A session on a free server of the key; None once the key has no server left at the tracker."""
    from tvm import rpc
    from tvm.rpc.base import TrackerCode, sendjson

    with _connect_tracker(address) as sock:
        sendjson(sock, [TrackerCode.REQUEST, device_key, "", 1])
        # The tracker queues a request until a server of the key is free, even once none is
        # left (the last one died): wait in steps and give up when the key has no server.
        deadline = time.monotonic() + timeout
        while not select.select([sock], [], [], 0.5)[0]:
            if not _registered(address, device_key):
                return None
            if time.monotonic() > deadline:
                raise DeviceLabError(f"device {device_key}: no free RPC server within {timeout:.0f} s "
                                     f"(tracker {_format(address)}; all busy?)")
        host, port, match_key = _reply(sock, address)
    return rpc.connect(host, port, match_key, session_timeout)


def _connect_tracker(address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    # TVM's TrackerSession has no timeouts (connecting retries for a minute, a request
    # waits forever), so speak its protocol here: magic, then JSON messages and answers.
    from tvm.rpc import base

    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise DeviceLabError(f"{_format(address)} is not a TVM RPC tracker")
    except BaseException:
        sock.close()
        raise
    return sock


def _reply(sock: socket.socket, address: tuple[str, int]) -> Any:
    from tvm.rpc import base

    code, value = base.recvjson(sock)
    if code != base.TrackerCode.SUCCESS:
        raise DeviceLabError(f"tracker {_format(address)}: request refused ({value})")
    return value


def add_cli(subparsers) -> None:
    """Register `canao device-lab up|status|down` on the CLI's subparsers."""
    p = subparsers.add_parser("device-lab", help="start, inspect or stop the TVM RPC device lab")
    p.add_argument("action", choices=("up", "status", "down"))
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address the tracker binds (`up`; default 127.0.0.1; a LAN address lets phones join)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"tracker port (`up`; default {DEFAULT_PORT})")
    p.set_defaults(func=_cmd_device_lab)


def _cmd_device_lab(args) -> None:
    if args.action == "up":
        result = up(args.host, args.port)
    elif args.action == "status":
        result = status()
    else:
        result = down()
    print(json.dumps(result, indent=1))
