"""A generation stream over a real connection (uvicorn on loopback): a client that goes away
stops the generation at its next token, and its place in the queue comes back."""

import threading
import time

import httpx

from canao.apps.service import Service
from canao.profiles import load_config
from tests.integration.conftest import running_server
from tests.unit.test_serve_generate import Holding


def test_a_client_that_goes_away_stops_the_generation(tiny_lm):
    service = Service(None, load_config("serve", "tiny"), str(tiny_lm))
    with running_server(service) as url:
        release = threading.Event()
        service.runners["generate"] = Holding(service.runners["generate"], 2, release.wait)  # after one token
        with httpx.stream("POST", f"{url}/v1/generate", json={"prompt": "Hi", "max_new_tokens": 30}) as response:
            assert next(line for line in response.iter_lines() if line.startswith("event: ")) == "event: token"
        # The server has seen the client go once it counts the request (when its response ends).
        deadline = time.monotonic() + 30
        while 'route="/v1/generate"' not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the server did not notice the client going"
            time.sleep(0.05)
        release.set()  # the held step ends, and gives the last token
        while any(service.admitted.values()):
            assert time.monotonic() < deadline, "the generation did not stop"
            time.sleep(0.05)
        generated = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                     if line.startswith("canao_generated_tokens_total")]
        assert generated == ["canao_generated_tokens_total 2.0"]
