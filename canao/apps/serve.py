"""`canao serve`: the QA and generation apps over HTTP (FastAPI on uvicorn) and their web page.

At most one model per task (a QA model, a generation model, or both), loaded in the
background at start-up; `/readyz` answers 200 once they are loaded. Inference of both
tasks runs on one worker thread, one request at a time, behind one bounded queue: a
request that finds `max_pending` requests admitted gets 429 at once, and one not answered
within its timeout gets 503 (a generation stream that has begun ends with an error event
instead), so no client waits without end. The limits come from ServeConfig and show in
the OpenAPI schema. No request value is ever part of a file path: the models are chosen at
start-up and the page is one fixed file.
"""

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException

from canao import hardware
from canao.apps import generate
from canao.apps.qa import SpanPredictor, open_predictor
from canao.config import ServeConfig, resolve_path, to_dict
from canao.data.squad import SquadExample
from canao.manifest import MANIFEST, read_manifest, sha256_file, verify_manifest

PAGE = Path(__file__).with_name("web") / "index.html"
# Pulled registry versions, relative to the project root; env CANAO_REGISTRY_CACHE overrides.
REGISTRY_CACHE = "outputs/registry"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # one decode step
# The tasks (qa: POST /v1/qa, generate: POST /v1/generate), each with the `canao serve` option naming its model.
MODEL_OPTIONS = {"qa": "--model", "generate": "--lm-model"}
log = logging.getLogger("uvicorn.error")  # uvicorn formats and prints this logger


def resolve_model(ref: str, device: str = "", option: str = "--model") -> Path:
    """The local directory holding model `ref` (given by `option`): a directory (a model or a
    compiled artifact), or a registry reference NAME@ALIAS (what k8s/serving passes). A reference is
    resolved through the MLflow Model Registry to its S3 version, which is pulled (verified)
    into REGISTRY_CACHE; `servable` then picks the directory to serve from it."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    name, at, alias = ref.partition("@")
    if not (at and name and alias):
        raise FileNotFoundError(f"{option} {ref}: neither a directory nor a registry reference NAME@ALIAS")
    from canao import registry, tracking

    try:
        source = tracking.model_source(name, alias)
    except tracking.TrackingError as e:
        raise ValueError(f"{option} {ref}: {e}") from None
    cache = resolve_path(os.environ.get("CANAO_REGISTRY_CACHE") or REGISTRY_CACHE)
    return servable(registry.pull_cached(source, cache), device)


def servable(version_dir: Path, device: str) -> Path:
    """In a pulled registry version: the compiled artifact for `device` (with `device` "",
    the only one it holds), else the model directory, which runs in PyTorch."""
    from canao.registry import COMPILED_DIR, MODEL_DIR

    compiled = version_dir / COMPILED_DIR
    devices = sorted(p.name for p in compiled.iterdir()) if compiled.is_dir() else []
    if device in devices:
        return compiled / device
    if not device and len(devices) == 1:
        return compiled / devices[0]
    if not device and len(devices) > 1:
        raise ValueError(f"device: {version_dir} holds artifacts compiled for {', '.join(devices)}; "
                         "set device to the one this machine is")
    if devices:
        log.warning("%s: nothing compiled for device %r (only for %s); serving the model in PyTorch", version_dir,
                    device, ", ".join(devices))
    return version_dir / MODEL_DIR


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the model directory's name, or the registry reference (NAME@ALIAS) it was pulled by
    version: str  # sha256 of its manifest.json (which holds every file's sha256), first 12 hex digits
    stage: str  # the stage that made it: teacher, compile, ...
    backend: str  # what runs it: torch, or one of a compiled artifact's backends
    device: str  # the device key it was compiled for; "cpu" for PyTorch
    target: dict  # the compiler's target (TVM's, as a mapping), or the PyTorch version
    seq_len: int  # QA: tokens per window; generation: the context window (prompt and new tokens)
    backend_ms: dict[str, float]  # start-up timing of each candidate backend: median ms per window


def load_model(model_dir: Path, cfg: ServeConfig) -> tuple[SpanPredictor, ModelInfo]:
    """A verified model directory as a predictor: a compiled artifact runs its fastest (or the
    configured) backend; a QA model directory runs in PyTorch with the windowing it was trained with."""
    manifest = verify_manifest(model_dir)
    version = sha256_file(model_dir / MANIFEST)[:12]
    predictor, backend, timings = open_predictor(model_dir, manifest, cfg.backend, hardware.threads(cfg.threads))
    if "backends" in manifest:
        compiled = manifest["config"]
        return predictor, ModelInfo(model_dir.name, version, manifest["stage"], backend, compiled["device"],
                                    compiled["target"], compiled["seq_len"], timings)
    import torch

    return predictor, ModelInfo(model_dir.name, version, manifest["stage"], backend, "cpu",
                                {"kind": "pytorch", "version": torch.__version__},
                                predictor.features_cfg.max_seq_len, timings)


def load_lm(model_dir: Path, cfg: ServeConfig) -> tuple[generate.TVMDecoder | generate.TorchDecoder, ModelInfo]:
    """A verified generation model as a decoder: a `canao compile-lm` artifact runs in TVM, a model
    directory in PyTorch (with generate's default context window)."""
    manifest = read_manifest(model_dir) or {}
    if manifest.get("stage") == "compile-lm":
        decoder = generate.TVMDecoder(model_dir)  # verifies the artifact's files as it opens
        device, target = manifest["config"]["device"], manifest["config"]["target"]
    else:
        import torch

        manifest = verify_manifest(model_dir)
        hardware.torch_threads(cfg.threads)
        decoder = generate.TorchDecoder(model_dir)
        device, target = "cpu", {"kind": "pytorch", "version": torch.__version__}
    return decoder, ModelInfo(model_dir.name, sha256_file(model_dir / MANIFEST)[:12], manifest["stage"],
                              decoder.backend, device, target, decoder.max_context, {})


LOADERS = {"qa": load_model, "generate": load_lm}


class Metrics:
    """Prometheus metrics of one app, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("canao_http_requests", "HTTP requests by route and status code",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("canao_http_request_duration_seconds", "Time to answer an HTTP request",
                                 ["route"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.inference = Histogram("canao_inference_seconds", "Model time per request, all its windows",
                                   ["task"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.pending = Gauge("canao_pending_requests", "Requests admitted: computing or queued",
                             registry=self.registry)
        self.model = Gauge("canao_model_info", "The models being served, one per task (value 1)",
                           ["task", "name", "version", "backend", "device"], registry=self.registry)
        self.first_token = Histogram("canao_time_to_first_token_seconds", "Generation: prompt in to first token out",
                                     buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.per_token = Histogram("canao_time_per_token_seconds", "Generation: mean time of each later token, "
                                   "per request", buckets=TOKEN_BUCKETS_S, registry=self.registry)
        self.tokens = Counter("canao_generated_tokens", "Generation: tokens generated", registry=self.registry)


class Overloaded(Exception):
    """`max_pending` requests are admitted already."""


class TimedOut(Exception):
    """A request not answered within its timeout (`request_timeout_s`, `generate_timeout_s`)."""

    def __init__(self, timeout_s: float):
        super().__init__(timeout_s)
        self.timeout_s = timeout_s


class InvalidField(ValueError):
    """A request field that passed the schema but cannot be used (a question too long for a window)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    @classmethod
    def named_in(cls, error: ValueError) -> "InvalidField":
        """generate's errors, which begin with the field they are about ("max_new_tokens: ...")."""
        return cls(str(error).partition(":")[0], str(error))


def _one(fn: Callable, *args) -> Iterator:
    """fn(*args) as the one item of an iterator, computed when it is asked for."""
    yield fn(*args)


class Service:
    """The models behind the API: loaded in the background, run on one worker thread behind a bounded queue."""

    def __init__(self, model_ref: str | None, cfg: ServeConfig, lm_ref: str | None = None):
        refs = {task: ref for task, ref in (("qa", model_ref), ("generate", lm_ref)) if ref}
        if not refs:
            raise ValueError("nothing to serve: give --model (question answering), --lm-model (generation) or both")
        # A bad reference fails here, before the server binds.
        self.model_dirs = {task: resolve_model(ref, cfg.device, MODEL_OPTIONS[task]) for task, ref in refs.items()}
        # A registry model goes by its reference (canao-qa@production), not the directory it was pulled into.
        self.model_names = {task: self.model_dirs[task].name if Path(ref).expanduser().is_dir() else ref
                            for task, ref in refs.items()}
        self.cfg = cfg
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="canao-inference")
        self.metrics = Metrics()
        self.runners = {}  # task -> its predictor (qa) or decoder (generate), once loaded
        self.infos: dict[str, ModelInfo] = {}  # task -> the model serving it, once loaded
        self.load_error: str | None = None
        self.admitted = 0  # changed on the event loop's thread only

    @property
    def ready(self) -> bool:
        return self.infos.keys() == self.model_dirs.keys()

    def load(self) -> None:
        """Load the models (on the worker thread: requests queue behind it)."""
        for task, model_dir in self.model_dirs.items():
            try:
                runner, info = LOADERS[task](model_dir, self.cfg)
            except Exception as e:  # reported by /readyz; the process stays up to say why
                self.load_error = f"{type(e).__name__}: {e}"
                log.error("%s: cannot serve: %s", model_dir, self.load_error)
                return
            self.runners[task], self.infos[task] = runner, replace(info, name=self.model_names[task])
            self.metrics.model.labels(task, info.name, info.version, info.backend, info.device).set(1)
            log.info("serving %s: %s version %s with %s (%s)", task, self.infos[task].name, info.version,
                     info.backend, info.backend_ms or info.target)

    def start_loading(self) -> None:
        if not self.ready:
            self.worker.submit(self.load)

    def require_ready(self, task: str | None = None) -> None:
        """503 unless every model is loaded (and, for `task`, unless it has one)."""
        if task is not None and task not in self.model_dirs:
            raise HTTPException(503, f"no {task} model: this server was started without {MODEL_OPTIONS[task]}")
        if not self.ready:
            raise HTTPException(503, f"model not ready: {self.load_error or 'loading'}", {"Retry-After": "1"})

    async def stream(self, items: Callable[[], Iterator], timeout_s: float) -> AsyncIterator:
        """The items of items(), computed on the worker thread and handed over as each comes, if the
        queue has room (else Overloaded); TimedOut once `timeout_s` have passed."""
        if self.admitted >= self.cfg.max_pending:
            raise Overloaded
        self.admitted += 1
        self.metrics.pending.set(self.admitted)
        deadline = time.monotonic() + timeout_s
        loop, handed, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        ended = object()

        def produce():
            try:
                for item in items():
                    if stop.is_set():
                        return
                    loop.call_soon_threadsafe(handed.put_nowait, item)
            except Exception as e:  # raised where the items are read
                loop.call_soon_threadsafe(handed.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(handed.put_nowait, ended)

        work = self.worker.submit(produce)
        done = asyncio.wrap_future(work)
        # Released when the work ends, not when its client stops waiting: the queue bounds real work.
        done.add_done_callback(self._release)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(handed.get(), deadline - time.monotonic())
                except TimeoutError:
                    raise TimedOut(timeout_s) from None
                if item is ended:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            # Nobody reads any more (done, timed out, or the request was cancelled): work still queued is
            # dropped; work computing stops at its next item. A no-op for work that is done.
            stop.set()
            work.cancel()

    async def run(self, fn, *args):
        """fn(*args) on the worker thread, if the queue has room and within `request_timeout_s`."""
        async with aclosing(self.stream(partial(_one, fn, *args), self.cfg.request_timeout_s)) as results:
            return await anext(results)

    def _release(self, done: asyncio.Future) -> None:
        self.admitted -= 1
        self.metrics.pending.set(self.admitted)
        if not done.cancelled():
            done.exception()  # read, so an answer nobody waited for is not logged as lost

    def answer(self, example: SquadExample):
        started = time.perf_counter()
        try:
            prediction = self.runners["qa"].predict([example])[example.qid]
        except ValueError as e:  # build_features: the question leaves no room for context in a window
            raise InvalidField("question", str(e)) from None
        self.metrics.inference.labels("qa").observe(time.perf_counter() - started)
        return prediction

    def generation(self, prompt: str, chat: bool, max_new_tokens: int, sampling: generate.Sampling
                   ) -> Iterator[tuple[str, BaseModel]]:
        """The events of one generation, as (event name, data): a token event per token, then done."""
        decoder = self.runners["generate"]
        try:
            ids = generate.encode_prompt(decoder.tokenizer, prompt, chat)
            ids, dropped = generate.fit_prompt(ids, max_new_tokens, decoder)
        except ValueError as e:  # an empty prompt, or more new tokens than the context window holds
            raise InvalidField.named_in(e) from None
        started, times = time.perf_counter(), []
        for token, ms, text in generate.with_text(decoder.tokenizer, generate.stream(decoder, ids, max_new_tokens,
                                                                                    sampling)):
            if not times:
                self.metrics.first_token.observe(ms / 1000)
            times.append(ms)
            self.metrics.tokens.inc()
            yield "token", TokenEvent(text=text, token=token)
        stats = generate.timings(times)
        self.metrics.inference.labels("generate").observe(time.perf_counter() - started)
        if stats["ms_per_token"] is not None:
            self.metrics.per_token.observe(stats["ms_per_token"] / 1000)
        yield "done", DoneEvent(**stats, prompt_tokens=len(ids), prompt_truncated=dropped > 0,
                                dropped_prompt_tokens=dropped)


class Problem(BaseModel):
    detail: str  # what went wrong, naming the limit


class QAResponse(BaseModel):
    answer: str = Field(description="the answer: a span of the context; empty when no span could be chosen")
    score: float = Field(ge=0, le=1, description="probability of the answer among the best spans")
    start: int = Field(ge=0, description="character offset of the answer in the context")
    end: int = Field(ge=0, description="character offset just past the answer")
    latency_ms: float = Field(ge=0, description="time in the server, queueing included")


class InfoResponse(BaseModel):
    models: dict[str, ModelInfo] = Field(description="the model serving each task: qa (POST /v1/qa), generate "
                                                     "(POST /v1/generate); a task this server was not given is absent")
    limits: dict[str, float]


class TokenEvent(BaseModel):
    text: str = Field(description="the text this token adds; empty while a character spans tokens")
    token: int = Field(ge=0, description="its token id")


class DoneEvent(BaseModel):
    new_tokens: int = Field(ge=1, description="tokens generated (max_new_tokens, or fewer at the end of text)")
    time_to_first_token_ms: float = Field(ge=0, description="from the first prefill call to the first token")
    ms_per_token: float | None = Field(ge=0, description="mean time of each token after the first; null for one")
    prompt_tokens: int = Field(ge=1, description="prompt tokens the model read")
    prompt_truncated: bool = Field(description="the prompt was cut from the left to fit the context window beside "
                                               "max_new_tokens")
    dropped_prompt_tokens: int = Field(ge=0, description="how many tokens were cut")


# The events of a generation stream: `event:` names one, `data:` holds its JSON.
STREAM_EVENTS = {"token": TokenEvent, "done": DoneEvent, "error": Problem}
STREAM_DESCRIPTION = ("Server-sent events: a `token` event per generated token, then one `done` event; a stream "
                      "that cannot finish (generate_timeout_s passed, the model failed) ends with an `error` event "
                      "instead.")


def _stream_content() -> dict:
    """The OpenAPI description of a generation stream (OpenAPI 3.2's itemSchema: the schema of each event)."""
    return {"text/event-stream": {"itemSchema": {"oneOf": [
        {"type": "object", "required": ["event", "data"],
         "properties": {"event": {"const": name}, "data": {"type": "string", "contentMediaType": "application/json",
                                                           "contentSchema": model.model_json_schema()}}}
        for name, model in STREAM_EVENTS.items()]}}}


def _sse(event: str, data: BaseModel) -> bytes:
    return format_sse_event(event=event, data_str=data.model_dump_json())


def _qa_request_model(cfg: ServeConfig) -> type[BaseModel]:
    """The QA request, with this server's limits in its schema."""

    class QARequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        context: str = Field(max_length=cfg.max_context_chars, pattern=r"\S",
                             description="the text to answer from; split into overlapping windows when long")
        question: str = Field(max_length=cfg.max_question_chars, pattern=r"\S",
                              description="must also leave room for context in one window, else 422")

    return QARequest


def _a_number(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


# Marks a field that takes JSON numbers only: pydantic's lax mode would also take true for 1 and "5" for 5,
# and its strict mode would refuse 2.0 for an integer.
NUMBER = BeforeValidator(_a_number)


def _generate_request_model(cfg: ServeConfig) -> type[BaseModel]:
    """The generation request, with this server's limits and generate.Sampling's bounds in its schema."""

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        # At least one character that is neither white space nor a control character (some of which the
        # tokenizer drops: a prompt of them alone would have no token).
        prompt: str = Field(max_length=cfg.max_prompt_chars, pattern=r"[^\s\x00-\x1f\x7f-\x9f]",
                            description="the text to continue, with some character other than white space and "
                                        "control characters; cut from the left when the context window cannot "
                                        "hold it beside max_new_tokens (the done event says so)")
        max_new_tokens: Annotated[int, NUMBER] = Field(
            cfg.max_new_tokens, ge=1, le=cfg.max_new_tokens,
            description="stop after this many tokens, or earlier at the end of text; 422 if the model's context "
                        "window holds fewer (default: the cap)")
        temperature: Annotated[float, NUMBER] = Field(
            0.0, ge=0, description="0: greedy; otherwise logits are divided by it")
        top_k: Annotated[int, NUMBER] = Field(
            0, ge=0, description="sample among the k most likely tokens only; 0: no limit")
        top_p: Annotated[float, NUMBER] = Field(
            1.0, gt=0, le=1, description="sample among the most likely tokens whose probabilities add up to top_p; "
                                         "1: no limit")
        seed: Annotated[int, NUMBER] = Field(
            0, ge=0, description="the sampler's seed: a request sent again samples the same tokens")
        chat: StrictBool = Field(True, description="wrap the prompt as one user turn of the model's chat template, as "
                                             "`canao generate` does unless --no-chat")

    return GenerateRequest


PROBLEMS = {
    413: "The request body is over max_body_bytes.",
    429: "max_pending requests are admitted already; retry after Retry-After seconds.",
    503: "No model serves this task (no Retry-After), the model is not loaded yet, or the request was not answered "
         "within its timeout; retry after Retry-After seconds.",
}


def _problems(*codes: int) -> dict:
    return {code: {"model": Problem, "description": PROBLEMS[code]} for code in codes}


class Observe:
    """Outermost ASGI middleware: count and time every HTTP request by its route (never by raw path)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413, whether its Content-Length says so or it
    arrives in chunks; a body within the limit is read whole and handed on."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = JSONResponse({"detail": f"request body: over the limit of {self.max_bytes} bytes"}, 413)
        await response(scope, receive, send)


async def _event_stream(first: tuple[str, BaseModel], events: AsyncIterator) -> AsyncIterator[bytes]:
    """The SSE bytes of `first` and the rest of `events`. The status is sent by now, so a failure
    ends the stream with an error event."""
    async with aclosing(events):
        try:
            yield _sse(*first)
            async for event in events:
                yield _sse(*event)
        except TimedOut as e:
            yield _sse("error", Problem(detail=f"stopped: not finished within {e.timeout_s} s"))
        except Exception as e:  # a model failure mid-stream
            log.exception("generation failed")
            yield _sse("error", Problem(detail=f"generation failed: {type(e).__name__}: {e}"))


def create_app(service: Service) -> FastAPI:
    cfg = service.cfg
    QARequest = _qa_request_model(cfg)
    GenerateRequest = _generate_request_model(cfg)
    page = PAGE.read_text()

    @asynccontextmanager
    async def lifespan(app):
        # The worker lives as long as the service (an ASGI host may start the app more than once);
        # at exit Python lets it finish the computation at hand and drops the queue.
        service.start_loading()
        yield

    # No /docs or /redoc: their pages load scripts from a CDN. The schema is at /openapi.json.
    app = FastAPI(title="canao", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Real-time extractive question answering and text generation with compiled "
                              "transformers. Also served, outside this schema: the web page at / and Prometheus "
                              "metrics at /metrics.")
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(Observe, metrics=service.metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        # FastAPI's 422 without echoing the input: it may be large, and text that is not valid
        # Unicode (a lone surrogate) cannot be sent back as JSON.
        errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request, exc):
        # FastAPI answers 400 to a body that is not UTF-8; that is invalid JSON (RFC 8259): 422 like the rest.
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            errors = [{"loc": ["body"], "msg": f"JSON must be UTF-8: {exc.__cause__}", "type": "json_invalid"}]
            return JSONResponse({"detail": errors}, 422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(Overloaded)
    async def overloaded(request, exc):
        return JSONResponse({"detail": f"busy: {cfg.max_pending} requests pending; retry later"}, 429,
                            headers={"Retry-After": "1"})

    @app.exception_handler(TimedOut)
    async def timed_out(request, exc):
        return JSONResponse({"detail": f"not answered within {exc.timeout_s} s; retry later"}, 503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(InvalidField)
    async def unusable(request, exc):
        return JSONResponse({"detail": [{"loc": ["body", exc.field], "msg": str(exc), "type": "value_error"}]}, 422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def web_page():
        return page

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process answers (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", responses=_problems(503))
    async def readyz() -> dict[str, str]:
        """The models are loaded and requests are served (readiness): the version serving each task."""
        service.require_ready()
        return {"status": "ready", **{task: info.version for task, info in service.infos.items()}}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", responses=_problems(503))
    async def info() -> InfoResponse:
        """The models being served, by task, where they run, and the request limits."""
        service.require_ready()
        limits = {k: v for k, v in to_dict(cfg).items() if k.startswith("max_") or k.endswith("_timeout_s")}
        return InfoResponse(models=service.infos, limits=limits)

    @app.post("/v1/qa", responses=_problems(413, 429, 503))
    async def qa(body: QARequest) -> QAResponse:
        """The answer to `question`: the best-scoring span of `context`."""
        started = time.perf_counter()
        service.require_ready("qa")
        prediction = await service.run(service.answer, SquadExample("request", body.question, body.context, ()))
        return QAResponse(answer=prediction.text, score=prediction.probability, start=prediction.start,
                          end=prediction.end, latency_ms=round((time.perf_counter() - started) * 1000, 3))

    # A streaming response class, not EventSourceResponse: FastAPI takes that for an endpoint that yields
    # its events, and here the response is returned only once the first token has come.
    @app.post("/v1/generate", response_class=StreamingResponse,
              responses={200: {"description": STREAM_DESCRIPTION, "content": _stream_content()},
                         **_problems(413, 429, 503)})
    async def generate_text(body: GenerateRequest):
        """The text that follows `prompt`, streamed token by token as server-sent events, ending with
        time to first token and ms/token. Errors found before the first token (a full queue, no token
        within generate_timeout_s, more new tokens than the context window holds) are plain HTTP errors."""
        service.require_ready("generate")
        sampling = generate.Sampling(body.temperature, body.top_k, body.top_p, body.seed)
        events = service.stream(partial(service.generation, body.prompt, body.chat, body.max_new_tokens, sampling),
                                cfg.generate_timeout_s)
        first = await anext(events)
        return EventSourceResponse(_event_stream(first, events), headers={"Cache-Control": "no-cache"})

    return app


def serve(model_ref: str | None, lm_ref: str | None, cfg: ServeConfig) -> None:
    import uvicorn

    uvicorn.run(create_app(Service(model_ref, cfg, lm_ref)), host=cfg.host, port=cfg.port, log_level="info",
                timeout_graceful_shutdown=5)
