"""`canao loadtest` starts `canao serve` on loopback, runs its clients for a bounded time, stops the server."""

import json

from canao.bench.suite import SERVING_SECTION, markdown_section
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
