"""The device profiles of the lab: `device_lab/devices.yaml` maps a tracker key to a device
(TVM target, threads, CPU cores, whether its servers run on this machine). A `Device` is
resolved once at the edge (the CLI, a component) and passed down; `tvm_target` resolves
`mcpu: host`, `pin` runs a process as the device, and `Device.hardware` says which machine
the key stands for (canao.hardware).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from canao import hardware
from canao.config import resolve_path
from canao.hardware import Hardware

DEVICES_FILE = "device_lab/devices.yaml"  # relative to the project root; env CANAO_DEVICES overrides
KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]+")  # the tracker splits its keys on ':' and whitespace
DEVICE_FIELDS = ("target", "threads", "cores", "description", "local", "servers")


class DeviceLabError(ValueError):
    """The device lab cannot do what was asked; the message names the key, file or field."""


@dataclass(frozen=True)
class Device:
    key: str  # tracker key the device's RPC servers register under
    target: dict  # TVM target as a mapping; `mcpu: host` is this machine's CPU (see tvm_target)
    threads: int  # TVM runtime worker threads on the device (TVM_NUM_THREADS)
    cores: tuple[int, ...]  # CPU ids its servers and the peer runtimes measured against it are pinned to
    description: str  # what the profile stands for
    local: bool  # `up` starts its servers on this machine; otherwise the device joins the tracker itself
    servers: int = 1  # RPC servers `up` starts for the key; a measurement moves to another if one dies

    def hardware(self) -> Hardware:
        """The machine the key stands for: this machine's CPU on the profile's cores if it is local,
        else the CPU its profile declares (a remote device's own cannot be read from here)."""
        if self.local:
            return hardware.host(len(self.cores))
        return hardware.declared(self.target, self.description, self.threads)


def devices_file(path: str | os.PathLike | None = None) -> Path:
    return resolve_path(path or os.environ.get("CANAO_DEVICES") or DEVICES_FILE)


def load_devices(path: str | os.PathLike | None = None) -> dict[str, Device]:
    """The device profiles of `path` (default: env CANAO_DEVICES, else device_lab/devices.yaml)."""
    file = devices_file(path)
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise DeviceLabError(f"{file}: device file not found") from None
    except yaml.YAMLError as e:
        raise DeviceLabError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not data:
        raise DeviceLabError(f"{file}: expected a mapping of device key -> device profile")
    return {str(key): _parse_device(f"{file}: {key}", str(key), entry) for key, entry in data.items()}


def _parse_device(where: str, key: str, entry: Any) -> Device:
    if not KEY_PATTERN.fullmatch(key):
        raise DeviceLabError(f"{where}: a device key may hold only letters, digits, '.', '_' and '-'")
    if not isinstance(entry, dict):
        raise DeviceLabError(f"{where}: expected a mapping with fields {', '.join(DEVICE_FIELDS)}")
    unknown = sorted(set(entry) - set(DEVICE_FIELDS))
    if unknown:
        raise DeviceLabError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(DEVICE_FIELDS)})")
    target = _field(entry, "target", dict, where)
    if "kind" not in target:
        raise DeviceLabError(f"{where}.target: needs a `kind`, e.g. {{kind: llvm, mcpu: host}}")
    threads = _field(entry, "threads", int, where)
    if threads < 1:
        raise DeviceLabError(f"{where}.threads: must be >= 1, got {threads}")
    # MetaSchedule tunes for target["num-cores"] threads: tuning for other than the measured count misleads.
    if target.get("num-cores", threads) != threads:
        raise DeviceLabError(f"{where}.target.num-cores: {target['num-cores']} differs from threads ({threads})")
    local = _field(entry, "local", bool, where)
    cores = _field(entry, "cores", list, where, default=[])
    if not all(type(c) is int and c >= 0 for c in cores) or len(set(cores)) != len(cores):
        raise DeviceLabError(f"{where}.cores: expected a list of distinct CPU ids (ints >= 0), got {cores!r}")
    if local and not cores:
        raise DeviceLabError(f"{where}.cores: required for a local device")
    if cores and threads > len(cores):
        raise DeviceLabError(f"{where}.threads: {threads} threads on {len(cores)} cores would oversubscribe them")
    servers = _field(entry, "servers", int, where, default=1)
    if servers < 1:
        raise DeviceLabError(f"{where}.servers: must be >= 1, got {servers}")
    return Device(key=key, target=target, threads=threads, cores=tuple(cores),
                  description=_field(entry, "description", str, where), local=local, servers=servers)


_REQUIRED = object()


def _field(entry: dict, name: str, kind: type, where: str, default: Any = _REQUIRED) -> Any:
    if name not in entry:
        if default is _REQUIRED:
            raise DeviceLabError(f"{where}.{name}: missing")
        return default
    value = entry[name]
    if type(value) is not kind:
        raise DeviceLabError(f"{where}.{name}: expected {kind.__name__}, got {value!r}")
    return value


def get_device(key: str, path: str | os.PathLike | None = None) -> Device:
    devices = load_devices(path)
    if key not in devices:
        raise DeviceLabError(f"device {key!r}: unknown (known: {', '.join(devices)}; from {devices_file(path)})")
    return devices[key]


def tvm_target(device: Device):
    """The device's tvm.target.Target, with `mcpu: host` resolved to this machine's CPU."""
    import tvm

    config = dict(device.target)
    if config.get("mcpu") == "host":
        config["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    try:
        return tvm.target.Target(config)
    except (ValueError, TypeError) as e:
        raise DeviceLabError(f"device {device.key}: target: {e}") from None


def runtime_env(device: Device) -> dict[str, str]:
    """Environment that gives a runtime the device's thread count: TVM's pool and OpenMP users."""
    threads = str(device.threads)
    # TVM pins its workers to CPUs 0..threads-1 of the whole machine, ignoring the process's
    # affinity mask; TVM_BIND_THREADS=0 keeps them inside the mask set from `cores`.
    return {"TVM_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "TVM_BIND_THREADS": "0"}


def pin(device: Device) -> None:
    """Run this process as `device`: its cores and thread count (call before any runtime starts its pool)."""
    _check_cores(device)
    os.sched_setaffinity(0, device.cores)
    os.environ.update(runtime_env(device))
    # PyTorch reads OMP_NUM_THREADS once, at import: a peer already imported needs telling.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(device.threads)


def _check_cores(device: Device) -> None:
    cpus = os.cpu_count() or 1
    if not device.cores:
        raise DeviceLabError(f"device {device.key}: cores: not set, so it cannot run on this machine")
    missing = [c for c in device.cores if c >= cpus]
    if missing:
        raise DeviceLabError(f"device {device.key}: cores: {missing} not on this machine (CPUs 0..{cpus - 1})")
