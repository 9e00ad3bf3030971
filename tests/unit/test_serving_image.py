"""The serving image holds the base dependencies only (pyproject.toml; Dockerfile's `serving`
stage): `canao serve` loads compiled artifacts of both tasks and answers them with every package
of the `pipeline` and `peers` extras hidden. Hidden means a direct dependency of an extra that no
base dependency also names; what only those bring in transitively is not checked here."""

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib

from canao.config import PROJECT_ROOT
from canao.qa.config import SquadFeatureConfig
from canao.qa.predictor import QAPredictor

EXTRAS = ("pipeline", "peers")

SERVE = """
import json, sys, time
for module in json.loads(sys.argv[1]):
    sys.modules[module] = None  # `import module` fails as in an image without it
from fastapi.testclient import TestClient
from canao.apps.serve import create_app
from canao.apps.service import Service
from canao.cli.main import build_parser
from canao.profiles import load_config

assert build_parser().parse_args(["serve", "--model", sys.argv[2]]).func.__name__ == "cmd_serve"
service = Service(sys.argv[2], load_config("serve", "tiny"), sys.argv[3])
with TestClient(create_app(service)) as client:
    deadline = time.monotonic() + 120
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.1)
    answer = client.post("/v1/qa", json=json.loads(sys.argv[4])).json()
    stream = client.post("/v1/generate", json={"prompt": "The capital of France is", "max_new_tokens": 4,
                                                "chat": False}).text
    backends = {task: m["backend"] for task, m in client.get("/v1/info").json()["models"].items()}
print(json.dumps({"answer": answer["answer"], "done": "event: done" in stream, "backends": backends}))
"""


def distribution(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>!~\[ ;]", requirement, maxsplit=1)[0]).lower()


def extras_only_modules() -> list[str]:
    """Top-level modules whose distributions are all direct dependencies of EXTRAS and none of the base."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    base = {distribution(r) for r in project["dependencies"]}
    extra = {distribution(r) for name in EXTRAS for r in project["optional-dependencies"][name]}
    modules = []
    for module, dists in importlib.metadata.packages_distributions().items():
        names = {distribution(d) for d in dists}
        if names & extra and not names & base:
            modules.append(module)
    return sorted(modules)


def test_serving_needs_no_package_of_the_pipeline_or_peers_extras(compiled_qa, compiled_lm, memorized_qa):
    hidden = extras_only_modules()
    assert {"kfp", "llama_cpp", "optuna", "gguf", "scipy"} <= set(hidden)  # the split is where the file says
    example = memorized_qa[1]
    asked = json.dumps({"context": example.context, "question": example.question})
    done = subprocess.run([sys.executable, "-c", SERVE, json.dumps(hidden), str(compiled_qa), str(compiled_lm[0]),
                           asked], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    windows = SquadFeatureConfig(max_seq_len=32, doc_stride=8)  # the artifact's (conftest.compiled_qa)
    reference = QAPredictor.from_dir(memorized_qa[0], windows).predict([example])[example.qid]
    assert served["answer"] == reference.text and served["done"], served
    assert served["backends"]["qa"] in ("tvm", "onnxruntime") and served["backends"]["generate"] == "tvm", served
