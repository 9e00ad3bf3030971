"""`canao loadtest`: concurrent clients against a server's /v1/qa or /v1/generate on loopback,
bounded in time and count.

Each client sends its next request as soon as its last one is answered, and waits the
Retry-After a 429 or 503 names before asking again, as a well-behaved client does. A QA
request is a SQuAD question and its context; a generation request is the question alone,
as a chat prompt, for `max_new_tokens` greedy tokens, its stream read to the end. For each
client count the figures are: answers (whole streams) per second, p50/p99 latency of
answered requests as the clients saw it, for generation also generated tokens per second
and p50/p99 time to the first token, and every outcome counted by status. Anything but
200, 429 and 503 (a request the server left unanswered past client_timeout_s, a stream
that ended with an `error` event) is an error. Only loopback addresses are ever a target.
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
from dataclasses import dataclass
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


STREAM_ERROR = "stream error"  # a generation stream answered 200 that ended with an `error` event


@dataclass
class Outcome:
    status: str  # the HTTP status, the name of the exception that ended the request, or STREAM_ERROR
    detail: str = ""  # what the server said, for an error's sample
    retry_after_s: float = 0.0  # a 429's or 503's Retry-After
    first_token_s: float | None = None  # generation: seconds from asking to the first token event
    tokens: int = 0  # generation: token events received


def _answered(response: httpx.Response) -> Outcome:
    return Outcome(str(response.status_code), response.text[:200], float(response.headers.get("retry-after", 0)))


async def ask_qa(http: httpx.AsyncClient, url: str, request: dict) -> Outcome:
    return _answered(await http.post(f"{url}/v1/qa", json=request))


async def ask_generate(http: httpx.AsyncClient, url: str, request: dict) -> Outcome:
    asked = time.perf_counter()
    async with http.stream("POST", f"{url}/v1/generate", json=request) as response:
        if response.status_code != 200:
            await response.aread()
            return _answered(response)
        outcome, event = Outcome("200"), ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
                if event == "token":
                    outcome.tokens += 1
                    if outcome.first_token_s is None:
                        outcome.first_token_s = time.perf_counter() - asked
            elif event == "error" and line.startswith("data: "):
                outcome.status, outcome.detail = STREAM_ERROR, line.removeprefix("data: ")[:200]
        return outcome


ASK = {"qa": ask_qa, "generate": ask_generate}  # LoadtestConfig.task -> one request, read whole


def _percentiles_ms(seconds: list[float], name: str) -> dict[str, float]:
    values = np.asarray(seconds) * 1000 if seconds else np.asarray([np.nan])
    return {f"{name}p50_ms": round(float(np.percentile(values, 50)), 1),
            f"{name}p99_ms": round(float(np.percentile(values, 99)), 1)}


async def _scenario(url: str, requests: list[dict], clients: int, cfg: LoadtestConfig) -> dict:
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    first_tokens: list[float] = []
    tokens = 0
    errors: list[str] = []
    sent = itertools.count()
    started = time.perf_counter()
    deadline = started + cfg.seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while (n := next(sent)) < cfg.max_requests and time.perf_counter() < deadline:
            asked = time.perf_counter()
            try:
                outcome = await ASK[cfg.task](http, url, requests[n % len(requests)])
            except httpx.HTTPError as e:
                outcome = Outcome(type(e).__name__)
            outcomes[outcome.status] += 1
            if outcome.status == "200":
                latencies.append(time.perf_counter() - asked)
                tokens += outcome.tokens
                if outcome.first_token_s is not None:
                    first_tokens.append(outcome.first_token_s)
            elif outcome.status not in EXPECTED:
                if len(errors) < 5:
                    errors.append(f"{outcome.status}: {outcome.detail}")
            else:
                await asyncio.sleep(max(0.0, min(outcome.retry_after_s, deadline - time.perf_counter())))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=cfg.client_timeout_s, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - started
    figures = {
        "clients": clients,
        "seconds": round(seconds, 2),
        "requests": sum(outcomes.values()),
        "status_counts": dict(sorted(outcomes.items())),
        "errors": sum(n for status, n in outcomes.items() if status not in EXPECTED),
        "error_samples": errors,
        "answers_per_s": round(len(latencies) / seconds, 2),
        **_percentiles_ms(latencies, ""),
    }
    if cfg.task == "generate":
        figures |= {"tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
                    **_percentiles_ms(first_tokens, "first_token_")}
    return figures


def run(url: str, cfg: LoadtestConfig) -> dict:
    """Every client count of `cfg` in turn against `cfg.task`'s endpoint of the server at `url` (answering already)."""
    check_loopback(url)
    url = url.rstrip("/")
    examples = load_squad(resolve_path(cfg.data_file), cfg.questions)
    requests = ([{"context": ex.context, "question": ex.question} for ex in examples] if cfg.task == "qa" else
                [{"prompt": ex.question, "max_new_tokens": cfg.max_new_tokens, "chat": True} for ex in examples])
    info = httpx.get(f"{url}/v1/info", timeout=10).raise_for_status().json()
    if cfg.task not in info["models"]:
        flag = "--model" if cfg.task == "qa" else "--lm-model"
        raise ValueError(f"task: {url} serves no {cfg.task} model (only: {', '.join(info['models']) or 'none'}); "
                         f"start it with {flag}")
    scenarios = [asyncio.run(_scenario(url, requests, clients, cfg)) for clients in cfg.clients]
    return {"host": hardware.host().label(), "url": url, "task": cfg.task,
            "model": {**info["models"][cfg.task], "limits": info["limits"]}, "config": to_dict(cfg),
            "scenarios": scenarios}


@contextlib.contextmanager
def spawned_server(model: str | None, profile: str, overrides: list[str], ready_timeout_s: float = 600,
                   lm_model: str | None = None):
    """`canao serve` for `model` (QA) and `lm_model` (generation) on a free loopback port, its URL
    once /readyz says ready; stopped on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "canao.cli.main", "serve", "--model", model or "", "--lm-model", lm_model or "",
               "--profile", profile,
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
    model, generation = result["model"], result["task"] == "generate"
    asked = (f"{result['config']['questions']} dev-a questions round-robin as chat prompts, "
             f"{result['config']['max_new_tokens']} greedy tokens each" if generation else
             f"{result['config']['questions']} dev-a questions round-robin")
    window = f"context window {model['seq_len']} tokens" if generation else f"{model['seq_len']} tokens per window"
    columns = ["clients", "seconds", "requests", "streams/s" if generation else "answers/s",
               *(["tokens/s", "first token p50 ms", "first token p99 ms"] if generation else []),
               "p50 ms", "p99 ms", "statuses", "errors"]
    lines = [
        f"{'Generation' if generation else 'QA'} serving, {model['name']} version {model['version']}: "
        f"{model['backend']} on {model['device']}, {window}; max_pending {model['limits']['max_pending']:.0f}; "
        f"{asked}; host {result['host']}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for s in result["scenarios"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in s["status_counts"].items())
        cells = [s["clients"], s["seconds"], s["requests"], s["answers_per_s"],
                 *([s["tokens_per_s"], s["first_token_p50_ms"], s["first_token_p99_ms"]] if generation else []),
                 s["p50_ms"], s["p99_ms"], statuses, s["errors"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def write(result: dict, path: str | Path) -> Path:
    """`path` (JSON) and the same path with .md (the table), each written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1))
    write_text_atomic(path.with_suffix(".md"), table(result) + "\n")
    return path.with_suffix(".md")
