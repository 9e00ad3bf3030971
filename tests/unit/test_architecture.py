"""House rules the layout promises: canao/ never imports kfp; one module each talks to MLflow and S3."""

import ast
import subprocess
import sys
from pathlib import Path

import canao

CANAO = Path(canao.__file__).parent


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def modules_importing(root: str) -> set[str]:
    return {p.relative_to(CANAO).as_posix() for p in CANAO.rglob("*.py") if root in imported_roots(p)}


def test_canao_never_imports_kfp():
    assert modules_importing("kfp") == set()
    # Importing every module of the library loads no kfp either (nothing pulls it in indirectly).
    modules = [f"canao.{p.relative_to(CANAO).with_suffix('').as_posix().replace('/', '.')}"
               for p in CANAO.rglob("*.py") if p.name not in ("__init__.py", "litert_convert.py")]
    code = f"import sys; [__import__(m) for m in {modules!r}]; print('kfp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_one_module_each_for_mlflow_and_s3():
    assert modules_importing("mlflow") == {"tracking.py"}
    assert modules_importing("boto3") | modules_importing("botocore") == {"registry.py"}
