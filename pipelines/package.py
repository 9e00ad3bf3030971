"""`make pipelines`: compile `canao-compress` to a Kubeflow Pipelines package (YAML)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kfp import compiler

from pipelines.canao_compress import canao_compress_on_cluster


def compile_pipeline(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(canao_compress_on_cluster, str(path))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="build/canao-compress.yaml")
    print(compile_pipeline(parser.parse_args().out))
