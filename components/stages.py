"""The components. Lightweight Python components: kfp ships each function's source into the
image (`base_image`, env CANAO_IMAGE; `make image` builds it) and calls it there; the body
only hands the artifacts to components/runtime.py, which makes the one canao call.
(No `from __future__ import annotations`: kfp reads the annotations as types.)"""

import functools
import os

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

IMAGE = os.environ.get("CANAO_IMAGE", "canao:0.1.0")
# The image holds kfp already (pyproject.toml): nothing is pip-installed when a task starts.
component = functools.partial(dsl.component, base_image=IMAGE, install_kfp_package=False)


@component
def open_run(run_name: str, profile: str, device: str, latency_budgets_ms: list) -> str:
    from components.runtime import open_run

    return open_run(run_name, profile, device, latency_budgets_ms)


@component
def teacher(profile: str, overrides: dict, device: str, parent_run_id: str, model: Output[Model],
            metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("teacher", profile, overrides, {}, model, metrics, device, parent_run_id)


@component
def compile_model(profile: str, overrides: dict, device: str, parent_run_id: str, model: Input[Model],
                  compiled: Output[Artifact], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("compile", profile, overrides, {"model": model}, compiled, metrics, device, parent_run_id)


@component
def benchmark(profile: str, overrides: dict, device: str, parent_run_id: str, model: Input[Model],
              compiled: Input[Artifact], records: Output[Artifact], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("benchmark", profile, overrides, {"model": model, "compiled": compiled}, records, metrics, device,
              parent_run_id)


@component
def deploy(profile: str, overrides: dict, device: str, parent_run_id: str, run_name: str, teacher: Input[Model],
           model: Input[Model], compiled: Input[Artifact], benchmark: Input[Artifact],
           teacher_benchmark: Input[Artifact], deployment: Output[Artifact], metrics: Output[Metrics]):
    from components.runtime import run_stage

    inputs = {"teacher": teacher, "model": model, "compiled": compiled, "benchmark": benchmark,
              "teacher_benchmark": teacher_benchmark}
    run_stage("deploy", profile, overrides, inputs, deployment, metrics, device, parent_run_id, run_name)


@component
def close_run(parent_run_id: str, deployment: Input[Artifact]):
    from components.runtime import close_run

    close_run(parent_run_id, deployment)
