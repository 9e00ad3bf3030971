"""manifest.json: what made an artifact directory, with what config, its metrics, and
the sha256 of every file, so a copy can be verified anywhere."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import canao
from canao.hardware import host, host_cpu

MANIFEST = "manifest.json"


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` beside `path`, then renamed onto it: readers see the old file or the whole
    new one, never a part (a run killed mid-write leaves no file that looks complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_records(records: list, path: str | Path, kept: list[dict] = ()) -> None:
    """A benchmark's records (dataclasses) as JSON with the host they were measured from, written
    atomically: a benchmark cut short leaves no file that looks complete. `kept`: records (as read
    back) of another run to write first."""
    write_text_atomic(path, json.dumps({"host": host().label(),
                                        "records": [*kept, *(dataclasses.asdict(r) for r in records)]}, indent=1))


@contextlib.contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """A staging directory beside `out_dir` that becomes `out_dir` only if the block succeeds
    (`out_dir` must not exist by then); on failure it is removed and nothing appears."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: str | Path) -> dict[str, str]:
    """sha256 of every file below `directory` except the manifest, by relative path."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(directory: str | Path, stage: str, config: dict, metrics: dict,
                   inputs: dict | None = None, config_hash: str | None = None, **extra) -> dict:
    """Write the manifest last, atomically: its presence marks the directory complete.
    `extra` adds stage-specific top-level keys (e.g. the compiled backends' files)."""
    directory = Path(directory)
    manifest = {
        "stage": stage,
        "canao_version": canao.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpu": host_cpu()[0],
                 "isa": list(host_cpu()[1])},
        "inputs": inputs or {},
        "config": config,
        "config_hash": config_hash,
        "metrics": metrics,
        "files": file_hashes(directory),
        **extra,
    }
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_stage(directory: str | Path, stage: str, what: str) -> dict:
    """`verify_manifest(directory)`, and that a `stage` stage made it; else an error naming `what`
    was expected (e.g. "a supernet (distill)") and what the directory holds instead."""
    manifest = verify_manifest(directory)
    if manifest["stage"] != stage:
        raise ValueError(f"{directory}: a {manifest['stage']!r} artifact, not {what}")
    return manifest


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def reusable(out_dir: str | Path, fingerprint: str, what: str) -> dict | None:
    """The manifest of `out_dir` if it already holds the `what` made with `fingerprint` (a stage
    re-run reuses its finished output); None if it holds nothing; an error if it holds something
    else, which is never overwritten."""
    existing = read_manifest(out_dir)
    if existing is None:
        return None
    if existing.get("config_hash") != fingerprint:
        raise FileExistsError(f"{out_dir}: holds a {what} made with another config or inputs; choose another --out")
    print(f"{out_dir}: {what} with this config and inputs already made; reusing it", flush=True)
    return existing


def check_file_name(name: object, where: str) -> str:
    """`name` if it is a relative path of plain parts (no '..', nothing absolute), the only file
    names a manifest may hold; else a ValueError naming it and `where` it was read."""
    if (not isinstance(name, str) or not name or name.startswith("/") or "\\" in name
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise ValueError(f"{where}: {name!r} is not a relative file name (absolute, '..', or empty parts)")
    return name


def inside(directory: str | Path, name: object, where: str) -> Path:
    """`directory`/`name` for a file name read from a manifest (`where` names the field), which
    must pass `check_file_name` and stay inside `directory` with symbolic links followed; else a
    ValueError. No name from a bucket or a manifest is trusted as a path."""
    path = Path(directory) / check_file_name(name, where)
    if not path.resolve().is_relative_to(Path(directory).resolve()):
        raise ValueError(f"{where}: {name!r} leads outside {directory} through a symbolic link")
    return path


def verify_manifest(directory: str | Path) -> dict:
    """The manifest of `directory` after checking every file's sha256 against it; every file it
    names, and every backend's file of a compiled artifact, must lie inside `directory`."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; the artifact is incomplete")
    where = f"{Path(directory) / MANIFEST}"
    for key, name in manifest.get("backends", {}).items():
        if name not in manifest["files"]:
            raise ValueError(f"{where}: field 'backends.{key}': {name!r} is not one of the artifact's files")
    for name, expected in manifest["files"].items():
        path = inside(directory, name, f"{where}: field 'files'")
        if not path.is_file():
            raise ValueError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != expected:
            raise ValueError(f"{path}: sha256 differs from {MANIFEST}")
    return manifest
