"""`canao serve`: the QA app over HTTP (FastAPI on uvicorn) and its web page.

One model per process, loaded in the background at start-up; `/readyz` answers 200 once
it is loaded. Inference runs on one worker thread, one request at a time, behind a
bounded queue: a request that finds `max_pending` requests admitted gets 429 at once, and
one not answered within `request_timeout_s` gets 503, so no client waits without end.
The limits come from ServeConfig and show in the OpenAPI schema. No request value is
ever part of a file path: the model is chosen at start-up and the page is one fixed file.
"""

import asyncio
import concurrent.futures
import logging
import os
import statistics
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from canao.apps.qa import QAPredictor, SpanPredictor, StaticShapePredictor
from canao.config import ServeConfig, SquadFeatureConfig, resolve_path, to_dict
from canao.data.squad import SquadExample
from canao.manifest import MANIFEST, sha256_file, verify_manifest

PAGE = Path(__file__).with_name("web") / "index.html"
# Pulled registry versions, relative to the project root; env CANAO_REGISTRY_CACHE overrides.
REGISTRY_CACHE = "outputs/registry"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
log = logging.getLogger("uvicorn.error")  # uvicorn formats and prints this logger


def resolve_model(ref: str, device: str = "") -> Path:
    """The local directory holding model `ref`: a directory (a QA model or a compiled
    artifact), or a registry reference NAME@ALIAS (what k8s/serving passes). A reference is
    resolved through the MLflow Model Registry to its S3 version, which is pulled (verified)
    into REGISTRY_CACHE; `servable` then picks the directory to serve from it."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    name, at, alias = ref.partition("@")
    if not (at and name and alias):
        raise FileNotFoundError(f"--model {ref}: neither a directory nor a registry reference NAME@ALIAS")
    from canao import registry, tracking

    try:
        source = tracking.model_source(name, alias)
    except tracking.TrackingError as e:
        raise ValueError(f"--model {ref}: {e}") from None
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
    seq_len: int  # tokens per window
    backend_ms: dict[str, float]  # start-up timing of each candidate backend: median ms per window


def load_model(model_dir: Path, cfg: ServeConfig) -> tuple[SpanPredictor, ModelInfo]:
    """A verified model directory as a predictor: a compiled artifact runs its fastest (or the
    configured) backend; a QA model directory runs in PyTorch with the windowing it was trained with."""
    manifest = verify_manifest(model_dir)
    version = sha256_file(model_dir / MANIFEST)[:12]
    threads = cfg.threads or len(os.sched_getaffinity(0))
    if "backends" in manifest:
        predictor, backend, timings = _load_artifact(model_dir, manifest, cfg.backend, threads)
        compiled = manifest["config"]
        return predictor, ModelInfo(model_dir.name, version, manifest["stage"], backend, compiled["device"],
                                    compiled["target"], compiled["seq_len"], timings)
    if cfg.backend not in ("auto", "torch"):
        raise ValueError(f"backend: {cfg.backend!r} needs a compiled artifact; {model_dir} is a model directory "
                         "(it runs in PyTorch)")
    import torch

    torch.set_num_threads(threads)
    predictor = QAPredictor.from_dir(model_dir)
    return predictor, ModelInfo(model_dir.name, version, manifest["stage"], "torch", "cpu",
                                {"kind": "pytorch", "version": torch.__version__},
                                predictor.features_cfg.max_seq_len, {})


def _load_artifact(artifact_dir: Path, manifest: dict, backend: str, threads: int
                   ) -> tuple[StaticShapePredictor, str, dict[str, float]]:
    from canao import peers
    from canao.bench import time_calls
    from canao.models.bert_qa import example_inputs, load_tokenizer

    compiled, backends = manifest["config"], manifest["backends"]
    if backend == "auto":
        numerics = manifest["metrics"]["numerics_max_abs_diff"]
        candidates = [b for b in backends if numerics.get(b, float("inf")) <= compiled["numerics_tol"]]
    elif backend in backends:
        candidates = [backend]
    else:
        raise ValueError(f"backend: {artifact_dir} has no {backend!r} (it has: {', '.join(backends)})")
    inputs = [t.numpy() for t in example_inputs(compiled["seq_len"])]
    runners, timings, failures = {}, {}, {}
    for name in candidates:
        try:
            runner = peers.runner(name, artifact_dir / backends[name], threads)
            # Few runs: enough to rank backends that differ by tens of percent, and an untuned
            # TVM library (seconds a window) does not hold the start-up for long.
            timings[name] = round(statistics.median(time_calls(runner, inputs, warmup=1, runs=5)), 3)
        except Exception as e:  # a backend that cannot run here (another CPU, a missing runtime)
            failures[name] = f"{type(e).__name__}: {e}"
            log.warning("%s: backend %s does not run here: %s", artifact_dir, name, failures[name])
            continue
        runners[name] = runner
    if not runners:
        raise RuntimeError(f"{artifact_dir}: none of the backends {candidates} runs here: {failures}")
    fastest = min(timings, key=timings.get)
    # The compiled length is the window; consecutive windows share a quarter of it.
    features = SquadFeatureConfig(max_seq_len=compiled["seq_len"], doc_stride=compiled["seq_len"] // 4)
    return StaticShapePredictor(runners[fastest], load_tokenizer(artifact_dir), features), fastest, timings


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
        self.model = Gauge("canao_model_info", "The model being served (value 1)",
                           ["name", "version", "backend", "device"], registry=self.registry)


class Overloaded(Exception):
    """`max_pending` requests are admitted already."""


class TimedOut(Exception):
    """A request not answered within `request_timeout_s`."""


class InvalidField(ValueError):
    """A request field that passed the schema but cannot be used (a question too long for a window)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Service:
    """The model behind the API: loaded in the background, run on one worker thread behind a bounded queue."""

    def __init__(self, model_ref: str, cfg: ServeConfig):
        # A bad reference fails here, before the server binds.
        self.model_dir = resolve_model(model_ref, cfg.device)
        # A registry model goes by its reference (canao-qa@production), not the directory it was pulled into.
        self.model_name = self.model_dir.name if Path(model_ref).expanduser().is_dir() else model_ref
        self.cfg = cfg
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="canao-inference")
        self.metrics = Metrics()
        self.predictor: SpanPredictor | None = None
        self.info: ModelInfo | None = None
        self.load_error: str | None = None
        self.admitted = 0  # changed on the event loop's thread only

    def load(self) -> None:
        """Load the model (on the worker thread: requests queue behind it)."""
        try:
            self.predictor, info = load_model(self.model_dir, self.cfg)
            self.info = replace(info, name=self.model_name)
        except Exception as e:  # reported by /readyz; the process stays up to say why
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("%s: cannot serve: %s", self.model_dir, self.load_error)
            return
        self.metrics.model.labels(self.info.name, self.info.version, self.info.backend, self.info.device).set(1)
        log.info("serving %s version %s with %s (%s)", self.info.name, self.info.version, self.info.backend,
                 self.info.backend_ms or self.info.target)

    def start_loading(self) -> None:
        if self.info is None:
            self.worker.submit(self.load)

    def require_ready(self) -> None:
        if self.info is None:
            raise HTTPException(503, f"model not ready: {self.load_error or 'loading'}", {"Retry-After": "1"})

    async def run(self, fn, *args):
        """fn(*args) on the worker thread, if the queue has room and within the request timeout."""
        if self.admitted >= self.cfg.max_pending:
            raise Overloaded
        self.admitted += 1
        self.metrics.pending.set(self.admitted)
        work = self.worker.submit(fn, *args)
        done = asyncio.wrap_future(work)
        # Released when the work ends, not when its client stops waiting: the queue bounds real work.
        done.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.cfg.request_timeout_s)
        except TimeoutError:
            raise TimedOut from None
        finally:
            # Nobody waits any more (timed out, or the request was cancelled): work still queued is
            # dropped; work already computing finishes unread. A no-op for work that is done.
            work.cancel()

    def _release(self, done: asyncio.Future) -> None:
        self.admitted -= 1
        self.metrics.pending.set(self.admitted)
        if not done.cancelled():
            done.exception()  # read, so an answer nobody waited for is not logged as lost

    def answer(self, example: SquadExample):
        started = time.perf_counter()
        try:
            prediction = self.predictor.predict([example])[example.qid]
        except ValueError as e:  # build_features: the question leaves no room for context in a window
            raise InvalidField("question", str(e)) from None
        self.metrics.inference.labels("qa").observe(time.perf_counter() - started)
        return prediction


class Problem(BaseModel):
    detail: str  # what went wrong, naming the limit


class QAResponse(BaseModel):
    answer: str = Field(description="the answer: a span of the context; empty when no span could be chosen")
    score: float = Field(ge=0, le=1, description="probability of the answer among the best spans")
    start: int = Field(ge=0, description="character offset of the answer in the context")
    end: int = Field(ge=0, description="character offset just past the answer")
    latency_ms: float = Field(ge=0, description="time in the server, queueing included")


class InfoResponse(BaseModel):
    name: str
    version: str
    stage: str
    backend: str
    device: str
    target: dict
    seq_len: int
    backend_ms: dict[str, float]
    tasks: list[str] = Field(description="the endpoints this model serves, by task: qa -> POST /v1/qa")
    limits: dict[str, float]


def _qa_request_model(cfg: ServeConfig) -> type[BaseModel]:
    """The QA request, with this server's limits in its schema."""

    class QARequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        context: str = Field(max_length=cfg.max_context_chars, pattern=r"\S",
                             description="the text to answer from; split into overlapping windows when long")
        question: str = Field(max_length=cfg.max_question_chars, pattern=r"\S",
                              description="must also leave room for context in one window, else 422")

    return QARequest


PROBLEMS = {
    413: "The request body is over max_body_bytes.",
    429: "max_pending requests are admitted already; retry after Retry-After seconds.",
    503: "The model is not loaded (yet), or the request was not answered within request_timeout_s; "
         "retry after Retry-After seconds.",
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


def create_app(service: Service) -> FastAPI:
    cfg = service.cfg
    QARequest = _qa_request_model(cfg)
    page = PAGE.read_text()

    @asynccontextmanager
    async def lifespan(app):
        # The worker lives as long as the service (an ASGI host may start the app more than once);
        # at exit Python lets it finish the computation at hand and drops the queue.
        service.start_loading()
        yield

    # No /docs or /redoc: their pages load scripts from a CDN. The schema is at /openapi.json.
    app = FastAPI(title="canao", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Real-time extractive question answering with a compiled transformer. "
                              "Also served, outside this schema: the web page at / and Prometheus metrics "
                              "at /metrics.")
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
        return JSONResponse({"detail": f"not answered within {cfg.request_timeout_s} s; retry later"}, 503,
                            headers={"Retry-After": "1"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def web_page():
        return page

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process answers (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", responses=_problems(503))
    async def readyz() -> dict[str, str]:
        """The model is loaded and requests are served (readiness)."""
        service.require_ready()
        return {"status": "ready", "version": service.info.version}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", responses=_problems(503))
    async def info() -> InfoResponse:
        """The model being served, where it runs, and the request limits."""
        service.require_ready()
        limits = {k: v for k, v in to_dict(cfg).items() if k.startswith("max_") or k == "request_timeout_s"}
        return InfoResponse(**asdict(service.info), tasks=["qa"], limits=limits)

    @app.post("/v1/qa", responses=_problems(413, 429, 503))
    async def qa(body: QARequest) -> QAResponse:
        """The answer to `question`: the best-scoring span of `context`."""
        started = time.perf_counter()
        service.require_ready()
        try:
            prediction = await service.run(service.answer, SquadExample("request", body.question, body.context, ()))
        except InvalidField as e:
            raise RequestValidationError([{"loc": ("body", e.field), "msg": str(e), "type": "value_error"}]) from None
        return QAResponse(answer=prediction.text, score=prediction.probability, start=prediction.start,
                          end=prediction.end, latency_ms=round((time.perf_counter() - started) * 1000, 3))

    return app


def serve(model_ref: str, cfg: ServeConfig) -> None:
    import uvicorn

    uvicorn.run(create_app(Service(model_ref, cfg)), host=cfg.host, port=cfg.port, log_level="info",
                timeout_graceful_shutdown=5)
