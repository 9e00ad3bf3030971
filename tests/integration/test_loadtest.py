"""`canao loadtest` starts `canao serve` on loopback, runs its clients for a bounded time, stops the server."""

import json

from canao.bench.suite import GENERATION_SERVING_SECTION, SERVING_SECTION, markdown_section
from canao.cli.main import main


def test_loadtest_of_a_spawned_server_answers_everything(memorized_qa, tmp_path, capsys):
    out, benchmarks = tmp_path / "loadtest.json", tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(f"# Benchmarks\n\n{SERVING_SECTION}\n\nan older run\n\n## Text generation\n\nkept\n")
    assert main(["loadtest", "--profile", "tiny", "--model", str(memorized_qa[0]), "--out", str(out),
                 "--benchmarks", str(benchmarks)]) == 0
    result = json.loads(out.read_text())
    (scenario,) = result["scenarios"]
    assert scenario["clients"] == 2 and scenario["errors"] == 0, scenario["error_samples"]
    assert 0 < scenario["requests"] <= 200 and scenario["seconds"] < 10
    assert scenario["status_counts"]["200"] > 0 and scenario["p50_ms"] <= scenario["p99_ms"]
    assert result["model"]["name"] == "model"
    table = out.with_suffix(".md").read_text()
    assert "| 2 |" in table and table in capsys.readouterr().out + "\n"
    # The table replaces the older run's in BENCHMARKS.md, with the command that made it; the rest stays.
    document = benchmarks.read_text()
    section = markdown_section(document, SERVING_SECTION)
    assert table in section and "an older run" not in document and "## Text generation\n\nkept" in document
    assert f"`canao loadtest --profile tiny --model {memorized_qa[0]} --out {out} --benchmarks {benchmarks}`" in section


def test_a_client_that_never_finishes_its_body_is_cut_off_and_connections_are_capped(memorized_qa):
    import socket
    import time

    import httpx

    from canao.apps.loadtest import spawned_server

    # tiny: body_timeout_s 2, max_connections 8
    with spawned_server(str(memorized_qa[0]), "tiny", []) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"POST /v1/qa HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"context\": ")
        started = time.monotonic()
        answer = b""
        while chunk := slow.recv(4096):  # until the server closes the connection
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ") and b"not received whole within 2.0 s" in answer
        assert 1.5 < time.monotonic() - started < 6
        slow.close()

        # Of 20 clients that never finish their bodies, the server holds at most max_connections at once
        # and answers the rest 503 at once instead of holding a socket each.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        for sock in clients:
            sock.sendall(b"POST /v1/qa HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n{")
        refused = 0
        for sock in clients:
            sock.settimeout(1.0)
            try:
                refused += sock.recv(4096).startswith(b"HTTP/1.1 503 ")
            except TimeoutError:
                pass  # held: still waiting for its body
        assert refused >= 20 - 8
        for sock in clients:
            sock.close()
        time.sleep(0.5)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def test_loadtest_of_a_generation_server_reads_every_stream(tiny_lm, tmp_path, capsys):
    out, benchmarks = tmp_path / "loadtest-lm.json", tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(f"# Benchmarks\n\n{SERVING_SECTION}\n\nthe QA table\n")
    assert main(["loadtest", "--profile", "tiny", "--set", "max_new_tokens=4", "--lm-model", str(tiny_lm),
                 "--out", str(out), "--benchmarks", str(benchmarks)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "generate" and result["model"]["backend"] == "torch"
    (scenario,) = result["scenarios"]
    assert scenario["errors"] == 0, scenario["error_samples"]
    answered = scenario["status_counts"]["200"]
    assert answered > 0 and 0 < scenario["tokens"] <= 4 * answered and scenario["tokens_per_s"] > 0
    assert 0 < scenario["first_token_p50_ms"] <= scenario["first_token_p99_ms"] <= scenario["p99_ms"]
    table = out.with_suffix(".md").read_text()
    assert "| tokens/s |" in table and table in capsys.readouterr().out + "\n"
    # Its own section beside the QA one, with the command that made it.
    document = benchmarks.read_text()
    section = markdown_section(document, GENERATION_SERVING_SECTION)
    assert table in section and "the QA table" in markdown_section(document, SERVING_SECTION)
    assert (f"`canao loadtest --profile tiny --set max_new_tokens=4 --lm-model {tiny_lm} --out {out} "
            f"--benchmarks {benchmarks}`") in section
