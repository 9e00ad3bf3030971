"""House rules the layout promises: canao/ never imports kfp; one module each talks to MLflow and S3."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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
               for p in CANAO.rglob("*.py") if p.name not in ("__init__.py", "litert_convert.py", "litert.py")]
    code = f"import sys; [__import__(m) for m in {modules!r}]; print('kfp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_one_module_each_for_mlflow_and_s3():
    assert modules_importing("mlflow") == {"mlops/tracking.py"}
    assert modules_importing("boto3") | modules_importing("botocore") == {"mlops/registry.py"}


# The layering, low to high: a module may import modules of its own layer or a lower one.
LAYERS = (
    ("canao.config", "canao.manifest", "canao.hardware", "canao.processes"),
    ("canao.lab",),
    ("canao.compile",),
    ("canao.qa.config", "canao.lm.config", "canao.profiles", "canao.codesign.space", "canao.codesign.elastic"),
    ("canao.qa.data", "canao.qa.space", "canao.qa.modeling_canao_bert", "canao.qa.model", "canao.lm.data",
     "canao.lm.space", "canao.lm.model", "canao.lm.teacher", "canao.lm.gguf", "canao.codesign"),
    ("canao.qa.predictor", "canao.lm.generator", "canao.qa.litert", "canao.lm.litert"),
    ("canao.qa.compile", "canao.lm.compile", "canao.qa.bench", "canao.lm.bench"),
    ("canao.qa", "canao.lm"),
    ("canao.bench", "canao.mlops"),
    ("canao.apps",),
    ("components", "pipelines"),
    ("canao.cli",),
)
STAGE_FILES = {"config", "data", "space", "model", "teacher", "distill", "compile", "litert", "bench", "latency",
               "search", "finalize"}
PROJECT = CANAO.parent


def project_modules() -> dict[str, Path]:
    paths = [p for root in ("canao", "components", "pipelines") for p in (PROJECT / root).rglob("*.py")]
    return {".".join(p.relative_to(PROJECT).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}


def import_edges() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in the file (inside functions too)."""
    modules = project_modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        edges[module] = {o for t in targets if (o := owner(t)) and o != module and o not in ("canao", "components",
                                                                                             "pipelines")}
    return edges


def layer(module: str) -> int:
    """The layer of the longest prefix that names `module` (a module, or a package it is in)."""
    matches = [(len(prefix), i) for i, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module}: in no layer of LAYERS"
    return max(matches)[1]


def test_no_module_imports_one_above_it():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in import_edges().items() for b in targets if layer(b) > layer(a)]
    assert upward == []


def test_no_import_cycle():
    edges, state, cycles = import_edges(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("importer, imported", [
    (("canao.codesign",), ("canao.qa", "canao.lm")),  # the co-design loop serves any family
    (("canao.compile",), ("canao.qa", "canao.lm")),  # the compiler compiles what a family hands it
    (("canao.qa", "canao.lm"), ("canao.bench",)),  # the suites stand above the families they run
])
def test_folders_keep_their_order(importer, imported):
    """Folder by folder, not only module by module: a wing holds modules of several layers, so a
    wing and a folder beside it could import each other without any module importing upward."""
    assert {(a, b) for a, targets in import_edges().items() if a.startswith(importer)
            for b in targets if b.startswith(imported)} == set()


def test_both_wings_have_the_same_stage_files():
    for wing in ("qa", "lm"):
        assert STAGE_FILES <= {p.stem for p in (CANAO / wing).glob("*.py")}, wing


def test_no_file_over_500_lines():
    long = {str(p.relative_to(PROJECT)): n for p in project_modules().values()
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
