"""`canao loadtest` starts `canao serve` on loopback, runs its clients for a bounded time, stops the server."""

import json

from canao.cli import main


def test_loadtest_of_a_spawned_server_answers_everything(memorized_qa, tmp_path, capsys):
    out = tmp_path / "loadtest.json"
    assert main(["loadtest", "--profile", "tiny", "--model", str(memorized_qa[0]), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (scenario,) = result["scenarios"]
    assert scenario["clients"] == 2 and scenario["errors"] == 0, scenario["error_samples"]
    assert 0 < scenario["requests"] <= 200 and scenario["seconds"] < 10
    assert scenario["status_counts"]["200"] > 0 and scenario["p50_ms"] <= scenario["p99_ms"]
    assert result["model"]["name"] == "model"
    table = out.with_suffix(".md").read_text()
    assert "| 2 |" in table and table in capsys.readouterr().out + "\n"
