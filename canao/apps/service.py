"""What `canao serve` serves: the models it loads (from a directory or the registry) and the
workers that run them.

At most one model per task (a QA model, a generation model, or both), loaded in the
background at start-up. Each task's inference runs on its own worker thread, one request at a
time, behind its own bounded queue (so a question never waits behind a long generation): a
request that finds `max_pending` requests of its task admitted is refused at once, and one not
answered within its timeout times out (a generation stream
that has begun ends with an error event instead), so no client waits without end. No
request value is ever part of a file path: the models are chosen at start-up.
"""

import asyncio
import concurrent.futures
import importlib.util
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from fastapi import HTTPException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, Field

from canao import hardware
from canao.config import ServeConfig, resolve_path
from canao.lm import generator
from canao.manifest import MANIFEST, read_manifest, sha256_file, verify_manifest
from canao.mlops import registry, tracking
from canao.mlops.registry import COMPILED_DIR, MODEL_DIR
from canao.qa.data import SquadExample
from canao.qa.predictor import SpanPredictor, open_predictor

PAGE = Path(__file__).with_name("web") / "index.html"


RESOLVE_RETRY_S = 2.0  # between attempts to resolve and pull a registry model
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # one decode step


# The tasks (qa: POST /v1/qa, generate: POST /v1/generate), each with the `canao serve` option naming its model.
MODEL_OPTIONS = {"qa": "--model", "generate": "--lm-model"}
log = logging.getLogger("uvicorn.error")  # uvicorn formats and prints this logger


def check_reference(ref: str, option: str = "--model") -> Path | None:
    """Model `ref` (given by `option`) as a local directory (a model or a compiled artifact), or
    None for a registry reference NAME@ALIAS (what k8s/serving passes), resolved later by
    `pull_model`; anything else is an error naming the option."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    name, at, alias = ref.partition("@")
    if not (at and name and alias):
        raise FileNotFoundError(f"{option} {ref}: neither a directory nor a registry reference NAME@ALIAS")
    return None


def pull_model(ref: str, cfg: ServeConfig, option: str = "--model") -> Path:
    """The directory to serve for registry reference `ref` (NAME@ALIAS): resolved through the
    MLflow Model Registry to its S3 version, pulled (verified) into the registry cache
    (`cfg.registry_cache`, env CANAO_REGISTRY_CACHE overrides), then `servable`'s choice in it.
    Tried again every few seconds while MLflow or S3 fails (a server starting, an alias not yet
    set) until `cfg.resolve_timeout_s` have passed; then the last error, naming the option."""
    name, _, alias = ref.partition("@")
    cache = resolve_path(os.environ.get("CANAO_REGISTRY_CACHE") or cfg.registry_cache)
    deadline = time.monotonic() + cfg.resolve_timeout_s
    while True:
        try:
            return servable(registry.pull_cached(tracking.model_source(name, alias), cache), cfg.device)
        except (tracking.TrackingError, registry.RegistryError) as e:
            if time.monotonic() + RESOLVE_RETRY_S > deadline:
                raise ValueError(f"{option} {ref}: not resolved within resolve_timeout_s "
                                 f"({cfg.resolve_timeout_s:g} s): {e}") from None
            log.warning("%s %s: %s; trying again in %g s", option, ref, e, RESOLVE_RETRY_S)
            time.sleep(RESOLVE_RETRY_S)


def servable(version_dir: Path, device: str) -> Path:
    """In a pulled registry version: the compiled artifact for `device` (with `device` "",
    the only one it holds), else the model directory, which runs in PyTorch."""
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
    return predictor, ModelInfo(model_dir.name, version, manifest["stage"], backend, "cpu", runtime_target("torch"),
                                predictor.features_cfg.max_seq_len, timings)


def load_lm(model_dir: Path, cfg: ServeConfig) -> tuple[generator.TVMDecoder | generator.LlamaCppDecoder
                                                       | generator.TorchDecoder, ModelInfo]:
    """A verified generation model as a decoder: a `canao compile-lm` artifact runs in TVM, a model
    directory in llama.cpp or PyTorch as `lm_backend` chooses (with generate's default context window)."""
    manifest = read_manifest(model_dir) or {}
    if manifest.get("stage") == "compile-lm":
        decoder = generator.TVMDecoder(model_dir)  # verifies the artifact's files as it opens
        device, target = manifest["config"]["device"], manifest["config"]["target"]
    else:
        manifest = verify_manifest(model_dir)  # the GGUF export, when there is one, among the verified files
        threads = hardware.torch_threads(cfg.threads)
        decoder = generator.open_decoder(model_dir, backend=lm_backend(model_dir, manifest, cfg), threads=threads)
        device, target = "cpu", runtime_target(decoder.backend)
    return decoder, ModelInfo(model_dir.name, sha256_file(model_dir / MANIFEST)[:12], manifest["stage"],
                              decoder.backend, device, target, decoder.max_context, {})


def lm_backend(model_dir: Path, manifest: dict, cfg: ServeConfig) -> str:
    """`cfg.lm_backend`, or for "auto": llama.cpp where `model_dir` has a GGUF export whose held-out
    perplexity in llama.cpp (manifest metric `gguf_perplexity`) is within `lm_perplexity_tol` of
    PyTorch's (`perplexity`) and llama-cpp-python is installed (the `peers` extra: the serving image
    has no llama.cpp), else PyTorch; a file never scored is not served."""
    if cfg.lm_backend != "auto":
        return cfg.lm_backend
    from canao.lm.gguf import exported_gguf, scored_within

    if (exported_gguf(model_dir) and scored_within(manifest.get("metrics", {}), cfg.lm_perplexity_tol)
            and importlib.util.find_spec("llama_cpp") is not None):
        return "llama.cpp"
    return "torch"


def runtime_target(backend: str) -> dict:
    """What a model directory runs on, for /v1/models: llama.cpp's or torch's version."""
    if backend == "llama.cpp":
        import llama_cpp

        return {"kind": "llama.cpp", "version": llama_cpp.__version__}
    import torch

    return {"kind": "pytorch", "version": torch.__version__}


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


class Service:
    """The models behind the API: loaded in the background, run on one worker thread behind a bounded queue."""

    def __init__(self, model_ref: str | None, cfg: ServeConfig, lm_ref: str | None = None):
        refs = {task: ref for task, ref in (("qa", model_ref), ("generate", lm_ref)) if ref}
        if not refs:
            raise ValueError("nothing to serve: give --model (question answering), --lm-model (generation) or both")
        # A malformed reference fails here, before the server binds; a registry one is pulled by `load`,
        # after it binds (a slow MLflow or S3 must not outlast a startup probe: /healthz answers meanwhile).
        self.refs = refs
        self.model_dirs = {task: check_reference(ref, MODEL_OPTIONS[task]) for task, ref in refs.items()}
        # A registry model goes by its reference (canao-qa@production), not the directory it was pulled into.
        self.model_names = {task: ref if self.model_dirs[task] is None else self.model_dirs[task].name
                            for task, ref in refs.items()}
        self.on_give_up: Callable[[], None] | None = None  # called when a model cannot be served (serve stops)
        self.cfg = cfg
        self.workers = {task: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"canao-{task}")
                        for task in refs}
        self.metrics = Metrics()
        self.runners = {}  # task -> its predictor (qa) or decoder (generate), once loaded
        self.infos: dict[str, ModelInfo] = {}  # task -> the model serving it, once loaded
        self.load_error: str | None = None
        self.admitted = dict.fromkeys(refs, 0)  # by task; changed on the event loop's thread only
        self.loading = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.infos.keys() == self.model_dirs.keys()

    def load(self, task: str) -> None:
        """Pull `task`'s model if it is a registry one and load it (on its worker thread: requests
        queue behind it). A failure is reported by /readyz, and `on_give_up` is called."""
        model_dir = self.model_dirs[task]
        try:
            # One load at a time: importing and building two models on two threads at once races in
            # the libraries' lazy imports and registrations (and each load times its backends).
            with self.loading:
                if model_dir is None:
                    model_dir = self.model_dirs[task] = pull_model(self.refs[task], self.cfg, MODEL_OPTIONS[task])
                runner, info = LOADERS[task](model_dir, self.cfg)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("%s: cannot serve: %s", model_dir or self.refs[task], self.load_error)
            if self.on_give_up is not None:
                self.on_give_up()
            return
        self.runners[task], self.infos[task] = runner, replace(info, name=self.model_names[task])
        self.metrics.model.labels(task, info.name, info.version, info.backend, info.device).set(1)
        log.info("serving %s: %s version %s with %s (%s)", task, self.infos[task].name, info.version,
                 info.backend, info.backend_ms or info.target)

    def start_loading(self) -> None:
        for task, worker in self.workers.items():
            if task not in self.infos:
                worker.submit(self.load, task)

    def require_ready(self, task: str | None = None) -> None:
        """503 unless every model is loaded (and, for `task`, unless it has one)."""
        if task is not None and task not in self.model_dirs:
            raise HTTPException(503, f"no {task} model: this server was started without {MODEL_OPTIONS[task]}")
        if not self.ready:
            raise HTTPException(503, f"model not ready: {self.load_error or 'loading'}", {"Retry-After": "1"})

    async def stream(self, task: str, items: Callable[[], Iterator], timeout_s: float) -> AsyncIterator:
        """The items of items(), computed on `task`'s worker thread and handed over as each comes, if
        its queue has room (else Overloaded); TimedOut once `timeout_s` have passed."""
        if self.admitted[task] >= self.cfg.max_pending:
            raise Overloaded
        self.admitted[task] += 1
        self.metrics.pending.set(sum(self.admitted.values()))
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

        work = self.workers[task].submit(produce)
        done = asyncio.wrap_future(work)
        # Released when the work ends, not when its client stops waiting: the queue bounds real work.
        done.add_done_callback(partial(self._release, task))
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

    async def run(self, task: str, fn, *args):
        """fn(*args) on `task`'s worker thread, if its queue has room and within `request_timeout_s`."""
        async with aclosing(self.stream(task, partial(_one, fn, *args), self.cfg.request_timeout_s)) as results:
            return await anext(results)

    def _release(self, task: str, done: asyncio.Future) -> None:
        self.admitted[task] -= 1
        self.metrics.pending.set(sum(self.admitted.values()))
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

    def generation(self, prompt: str, chat: bool, max_new_tokens: int, sampling: generator.Sampling
                   ) -> Iterator[tuple[str, BaseModel]]:
        """The events of one generation, as (event name, data): a token event per token, then done."""
        decoder = self.runners["generate"]
        try:
            ids = generator.encode_prompt(decoder.tokenizer, prompt, chat)
            ids, dropped = generator.fit_prompt(ids, max_new_tokens, decoder)
        except ValueError as e:  # an empty prompt, or more new tokens than the context window holds
            raise InvalidField.named_in(e) from None
        started, times = time.perf_counter(), []
        for token, ms, text in generator.with_text(decoder.tokenizer, generator.stream(decoder, ids, max_new_tokens,
                                                                                    sampling)):
            if not times:
                self.metrics.first_token.observe(ms / 1000)
            times.append(ms)
            self.metrics.tokens.inc()
            yield "token", TokenEvent(text=text, token=token)
        stats = generator.timings(times)
        self.metrics.inference.labels("generate").observe(time.perf_counter() - started)
        if stats["ms_per_token"] is not None:
            self.metrics.per_token.observe(stats["ms_per_token"] / 1000)
        yield "done", DoneEvent(**stats, prompt_tokens=len(ids), prompt_truncated=dropped > 0,
                                dropped_prompt_tokens=dropped)
