"""Servers started in sessions of their own, and stopping each as a whole process group; one call
run in a child process of its own.

The MLflow server, SeaweedFS and the device lab's tracker and RPC servers each run in a session
(so a process group) of their own: an interrupt of the shell that started them does not reach
them, and their workers share their group. A server is stopped when no process of its group is
left, not when its leader has exited: a worker (`mlflow server` starts uvicorn as a child) may
hold the port for as long as it lives, whichever of the two exits first.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import time
import traceback
from pathlib import Path


def spawn_session(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`command` in a new session, its output in `log`, no standard input."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def group_processes(groups: set[int], command_contains: bytes | None = None) -> dict[int, list[int]]:
    """Live (not zombie) processes of the given process groups, by group; with `command_contains`,
    only those whose command line holds it."""
    _reap(groups)
    found: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if state == "Z" or int(group) not in groups:
                continue
            if command_contains is not None and command_contains not in (stat.parent / "cmdline").read_bytes():
                continue
        except (OSError, ValueError):
            continue  # exited while we looked
        found.setdefault(int(group), []).append(int(stat.parent.name))
    return found


def stop_groups(groups: set[int], grace_s: float, kill_wait_s: float = 5.0) -> dict[int, list[int]]:
    """SIGTERM every process of `groups`, SIGKILL what is left after `grace_s`; returns the
    processes still alive after that (by group), normally none."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        for pids in group_processes(groups).values():
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait
        while group_processes(groups) and time.monotonic() < deadline:
            time.sleep(0.05)
    return group_processes(groups)


def _reap(groups: set[int]) -> None:
    # A leader is a child of the process that spawned it: reaped here, an exited one is not left a zombie.
    for leader in groups:
        try:
            os.waitpid(leader, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child, or already reaped


def call_in_child(what: str, fn, *args):
    """`fn(*args)` in a fresh spawned process (its own threads, CPU pinning and native libraries),
    its result returned and its exception raised here. A child that dies instead (a crash in native
    code: a signal) raises a RuntimeError naming `what` and its exit status: multiprocessing.Pool's
    `apply` would wait for it forever."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_call, args=(sender, fn, args), daemon=True)
    child.start()
    sender.close()
    try:
        ok, value = receiver.recv()
    except EOFError:
        child.join()
        code = child.exitcode
        died = f"killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"
        raise RuntimeError(f"{what}: its child process died ({died}) before returning") from None
    finally:
        receiver.close()
    child.join()
    if ok:
        return value
    raise value


def _child_call(sender, fn, args) -> None:
    try:
        result = (True, fn(*args))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
        result = (False, e)
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an exception that cannot cross the pipe goes as its text
            result = (False, RuntimeError("".join(traceback.format_exception(e))))
    sender.send(result)
    sender.close()
