"""The QA server in process (FastAPI's TestClient): answers, every limit, readiness, metrics, backends."""

import contextlib
import json
import shutil
import subprocess
import threading
import time

import pytest
from fastapi.testclient import TestClient

from canao.apps.loadtest import check_loopback
from canao.apps.serve import create_app
from canao.apps.service import Service
from canao.cli.main import main
from canao.config import PROFILES, ConfigError
from canao.profiles import load_config
from canao.qa.config import SquadFeatureConfig
from canao.qa.data import SquadExample, build_features
from canao.qa.predictor import QAPredictor

LIMITS = load_config("serve", "tiny")


LOADING = "model not ready: loading"


def loaded(client: TestClient, timeout_s: float = 120):
    """/readyz's answer once loading has ended, well or not."""
    deadline = time.monotonic() + timeout_s
    while (response := client.get("/readyz")).status_code == 503 and response.json()["detail"] == LOADING:
        assert time.monotonic() < deadline, "the model is still loading"
        time.sleep(0.05)
    return response


def wait_ready(client: TestClient) -> None:
    response = loaded(client)
    assert response.status_code == 200, response.text


@contextlib.contextmanager
def serving(model_dir, *overrides: str, lm_model=None, ready: bool = True):
    """A TestClient of `canao serve` with QA model `model_dir` and generation model `lm_model` (either may be None)."""
    service = Service(model_dir and str(model_dir), load_config("serve", "tiny", overrides=overrides),
                      lm_model and str(lm_model))
    with TestClient(create_app(service)) as client:
        if ready:
            wait_ready(client)
        yield client, service


@pytest.fixture(scope="module")
def client(memorized_qa):
    with serving(memorized_qa[0]) as (client, _):
        yield client


@pytest.fixture(scope="module")
def asked(memorized_qa) -> dict:
    """The memorized question as a request body."""
    example = memorized_qa[1]
    return {"context": example.context, "question": example.question}


def assert_field_error(response, field: str, text: str = "") -> None:
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"][-1] == field and text in e["msg"] for e in errors), errors


def test_answers_the_question_with_its_span_and_latency(client, asked, memorized_qa):
    response = client.post("/v1/qa", json=asked)
    assert response.status_code == 200
    out = response.json()
    assert out["answer"] == memorized_qa[1].answers[0].text == "a copper statue of Christ"
    assert asked["context"][out["start"] : out["end"]] == out["answer"]
    assert 0 < out["score"] <= 1 and out["latency_ms"] > 0


def test_a_long_context_is_split_into_windows_as_in_eval(client, asked, memorized_qa, tokenizer):
    context = " ".join([asked["context"]] * 5)
    assert len(context) <= LIMITS.max_context_chars
    predictor = QAPredictor.from_dir(memorized_qa[0])
    example = SquadExample("long", asked["question"], context, ())
    assert len(build_features([example], tokenizer, predictor.features_cfg)) > 1
    expected = predictor.predict([example])["long"]
    out = client.post("/v1/qa", json={**asked, "context": context}).json()
    assert (out["answer"], out["start"], out["end"]) == (expected.text, expected.start, expected.end)
    assert out["score"] == pytest.approx(expected.probability)


@pytest.mark.parametrize("body, field, text", [
    ({"question": "Who?"}, "context", "Field required"),
    ({"context": "Some text."}, "question", "Field required"),
    ({"context": 5, "question": "Who?"}, "context", "valid string"),
    ({"context": "   ", "question": "Who?"}, "context", "pattern"),
    ({"context": "Some text.", "question": "\n"}, "question", "pattern"),
    ({"context": "x" * (LIMITS.max_context_chars + 1), "question": "Who?"}, "context", "at most"),
    ({"context": "Some text.", "question": "w" * (LIMITS.max_question_chars + 1)}, "question", "at most"),
    ({"context": "Some text.", "question": "Who?", "path": "/etc/passwd"}, "path", "Extra inputs"),
])
def test_invalid_fields_get_422_naming_the_field(client, body, field, text):
    assert_field_error(client.post("/v1/qa", json=body), field, text)


# Characters that one reading of white space counts and another does not: U+0085 (Unicode's White_Space, which
# the server's validator uses, not ECMA-262's, which the schema's readers use), U+FEFF (ECMA only), U+001C (Python's
# str.isspace only), U+00A0 (all three).
WHITE_SPACE_EDGES = ["\x85", "\ufeff", "\x1c", "\xa0", "a\x85"]


def accepted(response, field: str) -> bool:
    """Whether `response` took `field` as valid (a 422 may name another field)."""
    return response.status_code != 422 or all(e["loc"][-1] != field for e in response.json()["detail"])


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node, to read the schema's patterns as ECMA-262 does")
def test_the_schema_and_the_server_agree_on_what_white_space_is(client, asked):
    """Every text pattern of the schema, read as a JSON Schema reader does (ECMA-262), accepts exactly the
    texts the server accepts: a schema-valid request never gets 422 for its pattern."""
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    patterns = {(model, field): spec["pattern"] for model, body in schema.items()
                for field, spec in body.get("properties", {}).items() if "pattern" in spec}
    assert {("QARequest", "context"), ("QARequest", "question"), ("GenerateRequest", "prompt")} <= set(patterns)
    script = ("const [pattern, ...texts] = JSON.parse(process.argv[1]);"
              "console.log(JSON.stringify(texts.map(t => new RegExp(pattern, 'u').test(t))))")
    for (model, field), pattern in patterns.items():
        done = subprocess.run(["node", "-e", script, json.dumps([pattern, *WHITE_SPACE_EDGES])], capture_output=True,
                              text=True, check=True)
        if model == "QARequest":
            served = [accepted(client.post("/v1/qa", json={**asked, field: text}), field) for text in WHITE_SPACE_EDGES]
            assert json.loads(done.stdout) == served, (field, pattern)


def test_a_question_too_long_for_a_window_gets_422_naming_question(client, asked):
    # Within the character limit, but more tokens than a 128-token window leaves beside the context.
    question = ",".join(["a"] * 100)  # 199 characters, 199 tokens
    assert len(question) <= LIMITS.max_question_chars
    assert_field_error(client.post("/v1/qa", json={**asked, "question": question}), "question", "tokens long")


def test_invalid_json_and_invalid_unicode_get_422(client):
    headers = {"content-type": "application/json"}
    response = client.post("/v1/qa", content=b'{"context": "text", "question": ', headers=headers)
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"
    response = client.post("/v1/qa", content='{"context": "é", "question": "?"}'.encode("latin-1"), headers=headers)
    assert response.status_code == 422 and "UTF-8" in response.json()["detail"][0]["msg"]
    lone_surrogate = b'{"context": "text \\ud800", "question": "Who?"}'
    assert_field_error(client.post("/v1/qa", content=lone_surrogate, headers=headers), "context", "unicode")


def test_a_body_over_the_limit_gets_413_declared_or_chunked(client):
    big = json.dumps({"context": "x" * LIMITS.max_body_bytes, "question": "Who?"}).encode()
    response = client.post("/v1/qa", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "16384 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    response = client.post("/v1/qa", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "content-length" not in response.request.headers


def test_only_the_allowed_host_names_are_answered(client, asked):
    assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 400
    assert client.post("/v1/qa", json=asked, headers={"host": "rebound.attacker.test:8000"}).status_code == 400
    assert client.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200


def test_a_full_queue_answers_429_at_once_and_room_comes_back(memorized_qa, asked):
    with serving(memorized_qa[0], "max_pending=1") as (client, service):
        release = threading.Event()
        holding = client.portal.start_task_soon(service.run, "qa", release.wait)  # takes the one place
        response = client.post("/v1/qa", json=asked)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert "1 requests pending" in response.json()["detail"]
        release.set()
        holding.result(timeout=10)
        assert client.post("/v1/qa", json=asked).status_code == 200


def test_a_request_not_answered_in_time_gets_503_and_frees_its_place(memorized_qa, asked):
    with serving(memorized_qa[0], "request_timeout_s=0.3", "max_pending=1") as (client, service):
        release = threading.Event()
        service.workers["qa"].submit(release.wait)  # the worker is busy; the request queues behind it
        response = client.post("/v1/qa", json=asked)
        assert response.status_code == 503 and "not answered within 0.3 s" in response.json()["detail"]
        release.set()
        deadline = time.monotonic() + 10
        while client.post("/v1/qa", json=asked).status_code != 200:  # the timed-out one was dropped from the queue
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_not_ready_until_loaded_while_alive(memorized_qa, asked):
    service = Service(str(memorized_qa[0]), LIMITS)
    release = threading.Event()
    service.workers["qa"].submit(release.wait)  # the start-up's loading queues behind this
    with TestClient(create_app(service)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        for response in (client.get("/readyz"), client.get("/v1/info"), client.post("/v1/qa", json=asked)):
            assert response.status_code == 503 and response.json()["detail"] == LOADING
            assert response.headers["retry-after"] == "1"
        release.set()
        wait_ready(client)


def test_a_model_whose_files_differ_from_its_manifest_is_never_served(memorized_qa, tmp_path, asked, capsys):
    tampered = shutil.copytree(memorized_qa[0], tmp_path / "model")
    with open(tampered / "config.json", "a") as f:
        f.write(" ")
    with serving(tampered, ready=False) as (client, _):
        assert "config.json: sha256 differs" in loaded(client).json()["detail"]
        assert client.post("/v1/qa", json=asked).status_code == 503
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "--model " in (err := capsys.readouterr().err) and "neither a directory nor a registry reference" in err
    assert main(["serve", "--lm-model", str(tmp_path / "nope")]) == 2
    assert "--lm-model " in (err := capsys.readouterr().err) and "neither a directory nor a registry reference" in err
    assert main(["serve"]) == 2
    assert "nothing to serve: give --model (question answering), --lm-model" in capsys.readouterr().err


def test_no_request_value_reaches_a_file_path(client):
    for path in ("/..%2f..%2fetc%2fpasswd", "/web/index.html", "/canao/apps/web/index.html", "/%2e%2e/manifest.json",
                 "/docs"):
        assert client.get(path).status_code == 404, path
    page = client.get("/")
    assert page.status_code == 200 and 'data-task="qa"' in page.text


def test_info_names_the_model_version_and_limits(client, memorized_qa):
    info = client.get("/v1/info").json()
    (model,) = info["models"].values()  # no generation model: only the QA one
    assert model["name"] == memorized_qa[0].name and len(model["version"]) == 12
    assert (model["backend"], model["device"], list(info["models"])) == ("torch", "cpu", ["qa"])
    assert info["limits"]["max_pending"] == LIMITS.max_pending
    assert client.get("/readyz").json() == {"status": "ready", "qa": model["version"]}
    response = client.post("/v1/generate", json={"prompt": "Hello"})
    assert response.status_code == 503 and "started without --lm-model" in response.json()["detail"]


def test_metrics_count_requests_time_them_and_name_the_model(client, asked):
    client.post("/v1/qa", json=asked)
    client.post("/v1/qa", json={})
    text = client.get("/metrics").text
    version = client.get("/v1/info").json()["models"]["qa"]["version"]
    assert 'canao_http_requests_total{method="POST",route="/v1/qa",status="200"}' in text
    assert 'canao_http_requests_total{method="POST",route="/v1/qa",status="422"}' in text
    assert 'canao_http_request_duration_seconds_bucket{le="0.005",route="/v1/qa"}' in text
    assert 'canao_inference_seconds_count{task="qa"}' in text
    assert f'canao_model_info{{backend="torch",device="cpu",name="model",task="qa",version="{version}"}} 1.0' in text


def test_a_compiled_artifact_serves_its_fastest_exact_backend(memorized_qa, compiled_qa, asked):
    with serving(compiled_qa) as (client, _):
        info = client.get("/v1/info").json()["models"]["qa"]
        assert set(info["backend_ms"]) == {"tvm", "onnxruntime"}
        assert info["backend"] == min(info["backend_ms"], key=info["backend_ms"].get)
        assert (info["device"], info["seq_len"], info["target"]["kind"]) == ("x86-1t", 32, "llvm")
        out = client.post("/v1/qa", json=asked).json()
    # The same windows in PyTorch give the same answer.
    windows = SquadFeatureConfig(max_seq_len=32, doc_stride=8)
    reference = QAPredictor.from_dir(memorized_qa[0], windows).predict([memorized_qa[1]])[memorized_qa[1].qid]
    assert (out["answer"], out["start"], out["end"]) == (reference.text, reference.start, reference.end)
    with serving(compiled_qa, "backend=onnxruntime") as (client, _):
        assert client.get("/v1/info").json()["models"]["qa"]["backend"] == "onnxruntime"
    with serving(compiled_qa, "backend=litert", ready=False) as (client, _):
        assert "has no 'litert' (it has: onnxruntime, tvm)" in loaded(client).json()["detail"]


def test_the_load_test_targets_loopback_only():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80", "http://127.3.4.5"):
        check_loopback(url)
    for url in ("http://10.0.0.1:8000", "http://192.168.1.2", "http://example.com", "http://0.0.0.0:80"):
        with pytest.raises(ValueError, match="loopback only"):
            check_loopback(url)


def test_the_load_tests_generation_client_reads_tokens_and_an_error_event_ends_a_stream_as_an_error():
    import asyncio

    import httpx

    from canao.apps.loadtest import STREAM_ERROR, ask_generate

    def streams(request):
        prompt = json.loads(request.content)["prompt"]
        events = [("token", {"text": "a"}), ("token", {"text": "b"})]
        events.append(("error", {"detail": "generate_timeout_s passed"}) if prompt == "slow" else ("done", {}))
        body = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async def ask(prompt):
        async with httpx.AsyncClient(transport=httpx.MockTransport(streams)) as http:
            return await ask_generate(http, "http://127.0.0.1:1", {"prompt": prompt})

    done, failed = asyncio.run(ask("hi")), asyncio.run(ask("slow"))
    assert (done.status, done.tokens) == ("200", 2) and done.first_token_s is not None
    assert failed.status == STREAM_ERROR and "generate_timeout_s" in failed.detail


@pytest.mark.parametrize("profile", PROFILES)
def test_serve_and_loadtest_configs_load_for_every_profile(profile):
    assert load_config("serve", profile).host == "127.0.0.1"
    assert load_config("loadtest", profile).clients


@pytest.mark.parametrize(("stage", "override", "error"), [
    ("serve", "max_pending=0", "max_pending: must be >= 1"),
    ("serve", "request_timeout_s=0", "request_timeout_s: must be > 0"),
    ("serve", "generate_timeout_s=-1", "generate_timeout_s: must be > 0"),
    ("serve", "max_new_tokens=0", "max_new_tokens: must be >= 1"),
    ("serve", "body_timeout_s=0", "body_timeout_s: must be > 0"),
    ("serve", "resolve_timeout_s=0", "resolve_timeout_s: must be > 0"),
    ("serve", "max_connections=0", "max_connections: must be >= 1"),
    ("serve", "allowed_hosts=[]", "allowed_hosts: host names"),
    ("loadtest", "clients=[4, 0]", "clients: must be counts >= 1"),
    ("loadtest", "task=translate", "task: expected one of qa, generate"),
    ("loadtest", "max_new_tokens=0", "max_new_tokens: must be >= 1"),
])
def test_bad_limits_are_refused_naming_the_key(stage, override, error):
    with pytest.raises(ConfigError, match=error):
        load_config(stage, "tiny", overrides=[override])
