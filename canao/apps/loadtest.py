"""`canao loadtest`: concurrent clients against a server's /v1/qa on loopback, bounded in time and count.

Each client asks its next SQuAD question as soon as its last one is answered, and waits
the Retry-After a 429 or 503 names before asking again, as a well-behaved client does.
For each client count the figures are: answers per second, p50/p99 latency of answered
requests as the clients saw it, and every outcome counted by status. Anything but 200,
429 and 503 (a request the server left unanswered past client_timeout_s included) is an
error. Only loopback addresses are ever a target.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import itertools
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

from canao import hardware
from canao.config import LoadtestConfig, resolve_path, to_dict
from canao.manifest import write_text_atomic
from canao.qa.data import load_squad

EXPECTED = {"200", "429", "503"}  # answered, or refused under overload as the API documents


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--url {url}: a load test targets loopback only (127.0.0.0/8, ::1, localhost)")


async def _scenario(url: str, requests: list[dict], clients: int, cfg: LoadtestConfig) -> dict:
    outcomes: collections.Counter[str] = collections.Counter()
    latencies_ms: list[float] = []
    errors: list[str] = []
    sent = itertools.count()
    started = time.perf_counter()
    deadline = started + cfg.seconds

    async def client(http: httpx.AsyncClient) -> None:
        while (n := next(sent)) < cfg.max_requests and time.perf_counter() < deadline:
            asked = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/qa", json=requests[n % len(requests)])
                status = str(response.status_code)
            except httpx.HTTPError as e:
                response, status = None, type(e).__name__
            outcomes[status] += 1
            if status == "200":
                latencies_ms.append((time.perf_counter() - asked) * 1000)
            elif status not in EXPECTED and len(errors) < 5:
                errors.append(f"{status}: {response.text[:200] if response is not None else ''}")
            elif response is not None and status in EXPECTED:
                wait = float(response.headers.get("retry-after", 0))
                await asyncio.sleep(max(0.0, min(wait, deadline - time.perf_counter())))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=cfg.client_timeout_s, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - started
    latencies = np.asarray(latencies_ms) if latencies_ms else np.asarray([np.nan])
    return {
        "clients": clients,
        "seconds": round(seconds, 2),
        "requests": sum(outcomes.values()),
        "status_counts": dict(sorted(outcomes.items())),
        "errors": sum(n for status, n in outcomes.items() if status not in EXPECTED),
        "error_samples": errors,
        "answers_per_s": round(len(latencies_ms) / seconds, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
    }


def run(url: str, cfg: LoadtestConfig) -> dict:
    """Every client count of `cfg` in turn against the server at `url` (answering already)."""
    check_loopback(url)
    url = url.rstrip("/")
    examples = load_squad(resolve_path(cfg.data_file), cfg.questions)
    requests = [{"context": ex.context, "question": ex.question} for ex in examples]
    info = httpx.get(f"{url}/v1/info", timeout=10).raise_for_status().json()
    if "qa" not in info["models"]:
        raise ValueError(f"{url} serves no QA model (only: {', '.join(info['models'])}); start it with --model")
    scenarios = [asyncio.run(_scenario(url, requests, clients, cfg)) for clients in cfg.clients]
    return {"host": hardware.host().label(), "url": url,
            "model": {**info["models"]["qa"], "limits": info["limits"]}, "config": to_dict(cfg), "scenarios": scenarios}


@contextlib.contextmanager
def spawned_server(model: str, profile: str, overrides: list[str], ready_timeout_s: float = 600):
    """`canao serve` for `model` on a free loopback port, its URL once /readyz says ready; stopped on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "canao.cli.main", "serve", "--model", model, "--profile", profile,
               "--host", "127.0.0.1", "--port", str(port), *(f"--set={o}" for o in overrides)]
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"canao serve exited with {server.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"canao serve: not ready after {ready_timeout_s} s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def table(result: dict) -> str:
    model = result["model"]
    lines = [
        f"QA serving, {model['name']} version {model['version']}: {model['backend']} on {model['device']}, "
        f"{model['seq_len']} tokens per window; max_pending {model['limits']['max_pending']:.0f}; "
        f"{result['config']['questions']} dev-a questions round-robin; host {result['host']}.",
        "",
        "| clients | seconds | requests | answers/s | p50 ms | p99 ms | statuses | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["scenarios"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in s["status_counts"].items())
        lines.append(f"| {s['clients']} | {s['seconds']} | {s['requests']} | {s['answers_per_s']} | {s['p50_ms']} | "
                     f"{s['p99_ms']} | {statuses} | {s['errors']} |")
    return "\n".join(lines)


def write(result: dict, path: str | Path) -> Path:
    """`path` (JSON) and the same path with .md (the table), each written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1))
    write_text_atomic(path.with_suffix(".md"), table(result) + "\n")
    return path.with_suffix(".md")
