"""The OpenAPI schema matches the server's behaviour: schemathesis generates valid and invalid
requests from the schema and checks every response against it (status codes, content types,
bodies, valid data accepted, invalid data rejected)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from canao.apps.serve import Service, create_app
from tests.unit.test_serve import LIMITS


@pytest.fixture(scope="module")
def api_schema(memorized_qa):
    service = Service(str(memorized_qa[0]), LIMITS)
    service.load()  # before the generated requests, so that they meet a ready model
    assert service.info is not None, service.load_error
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(service))


def test_the_schema_lists_the_api(api_schema):
    paths = {op.ok().path for op in api_schema.get_all_operations()}
    assert paths == {"/healthz", "/readyz", "/v1/info", "/v1/qa"}


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=str)
def test_every_response_matches_the_schema(api_schema, mode):
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode == schemathesis.GenerationMode.NEGATIVE and not operation.body:
            continue  # no input to get wrong

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate()

        check()
