"""The OpenAPI schema matches the server's behaviour: schemathesis generates valid and invalid
requests from the schema and checks every response against it (status codes, content types,
bodies, valid data accepted, invalid data rejected, and each event of a generation stream
against the schema of its event)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from canao.apps.serve import create_app
from canao.apps.service import Service
from tests.unit.test_serve import LIMITS
from tests.unit.test_serve_generate import parse_events


@pytest.fixture(scope="module")
def api_schema(memorized_qa, tiny_lm):
    service = Service(str(memorized_qa[0]), LIMITS, str(tiny_lm))
    service.load()  # before the generated requests, so that they meet ready models
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
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call_and_validate()  # each event of a stream against the schema of its event
            if case.path == "/v1/generate" and response.status_code == 200 and not response.stream_cut_short:
                assert [name for name, _ in parse_events(response.text)][-1] == "done"  # a whole stream

        check()
