"""`canao serve`: the QA and generation apps over HTTP (FastAPI on uvicorn) and their web page.

The HTTP face of canao.apps.service: `/readyz` answers 200 once the models are loaded, a
full queue answers 429 and a timeout 503, and the limits come from ServeConfig and show in
the OpenAPI schema. The page is one fixed file.
"""

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import Annotated

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from canao.apps.service import (
    PAGE,
    DoneEvent,
    InvalidField,
    Metrics,
    ModelInfo,
    Overloaded,
    Service,
    TimedOut,
    TokenEvent,
    log,
)
from canao.config import ServeConfig, to_dict
from canao.lm import generator
from canao.qa.data import SquadExample


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


# Some character other than white space, as the schema's readers (ECMA-262) and the server's validator
# (Unicode's White_Space) both read it: U+0085 is white space only to the second, U+FEFF only to the first.
SOME_TEXT = r"[^\s\x85\ufeff]"


def _qa_request_model(cfg: ServeConfig) -> type[BaseModel]:
    """The QA request, with this server's limits in its schema."""

    class QARequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        context: str = Field(max_length=cfg.max_context_chars, pattern=SOME_TEXT,
                             description="the text to answer from; split into overlapping windows when long")
        question: str = Field(max_length=cfg.max_question_chars, pattern=SOME_TEXT,
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
    """The generation request, with this server's limits and generator.Sampling's bounds in its schema."""

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        # At least one character that is neither white space nor a control character (some of which the
        # tokenizer drops: a prompt of them alone would have no token).
        prompt: str = Field(max_length=cfg.max_prompt_chars, pattern=r"[^\s\x00-\x1f\x7f-\x9f\ufeff]",
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
    arrives in chunks; one not received whole within `timeout_s` of its headers gets 408 and its
    connection closed (a client that never finishes its body holds nothing); a body within both
    limits is read whole and handed on."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, 413, self._too_large)
        body, more = b"", True
        try:
            async with asyncio.timeout(self.timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    if len(body) > self.max_bytes:
                        return await self._refuse(scope, receive, send, 413, self._too_large)
                    more = message.get("more_body", False)
        except TimeoutError:
            return await self._refuse(scope, receive, send, 408, f"not received whole within {self.timeout_s} s")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @property
    def _too_large(self) -> str:
        return f"over the limit of {self.max_bytes} bytes"

    @staticmethod
    async def _refuse(scope, receive, send, status: int, why: str):
        # Connection: close: the rest of the body is never read, so the connection cannot carry another request.
        response = JSONResponse({"detail": f"request body: {why}"}, status, headers={"Connection": "close"})
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
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, timeout_s=cfg.body_timeout_s)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(cfg.allowed_hosts))
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
        prediction = await service.run("qa", service.answer,
                                       SquadExample("request", body.question, body.context, ()))
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
        sampling = generator.Sampling(body.temperature, body.top_k, body.top_p, body.seed)
        events = service.stream("generate", partial(service.generation, body.prompt, body.chat,
                                                    body.max_new_tokens, sampling), cfg.generate_timeout_s)
        first = await anext(events)
        return EventSourceResponse(_event_stream(first, events), headers={"Cache-Control": "no-cache"})

    return app


def serve(model_ref: str | None, lm_ref: str | None, cfg: ServeConfig) -> int:
    """Serve until stopped (0), or until a model cannot be served (1: /readyz said why, the log too)."""
    import uvicorn

    # MLflow's client retries a refused request for minutes by default; pull_model retries instead,
    # within resolve_timeout_s.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    service = Service(model_ref, cfg, lm_ref)
    # limit_concurrency: connections beyond max_connections get 503 at once instead of a socket each.
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=cfg.host, port=cfg.port, log_level="info",
                                           timeout_graceful_shutdown=5, limit_concurrency=cfg.max_connections))

    def give_up() -> None:
        server.should_exit = True

    service.on_give_up = give_up
    server.run()
    return 1 if service.load_error else 0
