"""The OpenAPI schema matches the server's behaviour: schemathesis generates valid and invalid
requests from the schema and checks every response against it (status codes, content types,
bodies, valid data accepted, invalid data rejected, and each event of a generation stream
against the schema of its event)."""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from canao.apps.serve import create_app
from canao.apps.service import Service
from tests.unit.test_serve import LIMITS
from tests.unit.test_serve_generate import parse_events

# `make fuzz` sets it: that many new random cases a run instead of the same 100 every run.
FUZZ_EXAMPLES = int(os.environ.get("CANAO_FUZZ_EXAMPLES") or 0)


@pytest.fixture(scope="module")
def api_schema(memorized_qa, tiny_lm):
    service = Service(str(memorized_qa[0]), LIMITS, str(tiny_lm))
    for task in service.model_dirs:  # before the generated requests, so that they meet ready models
        service.load(task)
    assert service.ready, service.load_error
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(service))


def test_the_schema_lists_the_api(api_schema):
    paths = {op.ok().path for op in api_schema.get_all_operations()}
    assert paths == {"/healthz", "/readyz", "/v1/info", "/v1/qa", "/v1/generate"}


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=str)
def test_every_response_matches_the_schema(api_schema, mode):
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode == schemathesis.GenerationMode.NEGATIVE and not operation.body:
            continue  # no input to get wrong

        @given(case=operation.as_strategy(generation_mode=mode))
        # Derandomized: the same cases every run, so CI never passes or fails by chance.
        @settings(max_examples=FUZZ_EXAMPLES or 100, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=not FUZZ_EXAMPLES)
        def check(case):
            response = case.call_and_validate()  # each event of a stream against the schema of its event
            if case.path == "/v1/generate" and response.status_code == 200 and not response.stream_cut_short:
                assert [name for name, _ in parse_events(response.text)][-1] == "done"  # a whole stream

        check()


# ECMA-262's \s (WhiteSpace and LineTerminator), the meaning a client reading the OpenAPI schema gives it.
ECMA_SPACE = "\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff" + "".join(map(chr, range(0x2000, 0x200b)))


def test_schema_and_server_accept_and_reject_the_same_white_space_and_control_characters():
    """Every Unicode white-space, control and format character of the Basic Multilingual Plane, alone
    as a text field: the schema's pattern read as ECMA-262 reads it and the server's validator agree."""
    import re
    import unicodedata

    from pydantic import ValidationError

    from canao.apps.serve import _generate_request_model, _qa_request_model

    candidates = [chr(c) for c in range(0x10000) if chr(c).isspace() or chr(c) in ECMA_SPACE
                  or unicodedata.category(chr(c)) in ("Cc", "Cf", "Zs", "Zl", "Zp")]
    models = {"context": _qa_request_model(LIMITS), "question": _qa_request_model(LIMITS),
              "prompt": _generate_request_model(LIMITS)}
    disagree = []
    for name, model in models.items():
        pattern = model.model_json_schema()["properties"][name]["pattern"]
        ecma = re.compile(pattern.replace(r"\s", re.escape(ECMA_SPACE)))
        for ch in candidates:
            body = {"context": "text", "question": "text"} if name != "prompt" else {}
            try:
                model.model_validate({**body, name: f"{ch}{ch}"})
                served = True
            except ValidationError:
                served = False
            if served != bool(ecma.search(f"{ch}{ch}")):
                disagree.append(f"{name}: U+{ord(ch):04X} schema {not served}, server {served}")
    assert disagree == []
