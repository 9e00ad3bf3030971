"""The components. Lightweight Python components: kfp ships each function's source into the
image (`base_image`, env CANAO_IMAGE; `make image` builds it) and calls it there; the body
only hands the artifacts to components/runtime.py, which makes the one canao call (so each
body imports it: kfp runs the function's source alone, without this module's imports).
(No `from __future__ import annotations`: kfp reads the annotations as types.)"""

import functools
import os
from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

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
def distill(profile: str, overrides: dict, device: str, parent_run_id: str, teacher: Input[Model],
            supernet: Output[Model], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("distill", profile, overrides, {"teacher": teacher}, supernet, metrics, device, parent_run_id)


@component
def latency(profile: str, overrides: dict, device: str, parent_run_id: str, teacher: Input[Model],
            latency_model: Output[Artifact], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("latency", profile, overrides, {"teacher": teacher}, latency_model, metrics, device, parent_run_id)


@component
def search(profile: str, overrides: dict, device: str, parent_run_id: str, latency_budgets_ms: list,
           supernet: Input[Model], latency_model: Input[Artifact], front: Output[Artifact], metrics: Output[Metrics]):
    from components.runtime import run_stage, with_latency_budget

    run_stage("search", profile, with_latency_budget(overrides, latency_budgets_ms),
              {"supernet": supernet, "latency": latency_model}, front, metrics, device, parent_run_id)


@component
def finalize(profile: str, overrides: dict, device: str, parent_run_id: str, teacher: Input[Model],
             supernet: Input[Model], front: Input[Artifact], model: Output[Model], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("finalize", profile, overrides,
              {"teacher": teacher, "supernet": supernet, "search": front}, model, metrics, device, parent_run_id)


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
           teacher_benchmark: Input[Artifact], front: Input[Artifact], deployment: Output[Artifact],
           metrics: Output[Metrics]):
    from components.runtime import run_stage

    inputs = {"teacher": teacher, "model": model, "compiled": compiled, "benchmark": benchmark,
              "teacher_benchmark": teacher_benchmark, "search": front}
    run_stage("deploy", profile, overrides, inputs, deployment, metrics, device, parent_run_id, run_name)


# The generation chain: lm-teacher -> distill-lm (on lm-data's corpus) -> latency-lm -> search-lm ->
# finalize-lm -> benchmark-lm -> deploy-lm.


@component
def lm_teacher(profile: str, overrides: dict, device: str, parent_run_id: str, model: Output[Model],
               metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("lm-teacher", profile, overrides, {}, model, metrics, device, parent_run_id)


@component
def lm_data(profile: str, overrides: dict, device: str, parent_run_id: str, corpus: Output[Dataset],
            metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("lm-data", profile, overrides, {}, corpus, metrics, device, parent_run_id)


@component
def distill_lm(profile: str, overrides: dict, device: str, parent_run_id: str, teacher: Input[Model],
               corpus: Input[Dataset], supernet: Output[Model], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("distill-lm", profile, overrides, {"teacher": teacher, "data": corpus}, supernet, metrics, device,
              parent_run_id)


@component
def latency_lm(profile: str, overrides: dict, device: str, parent_run_id: str, teacher: Input[Model],
               latency_model: Output[Artifact], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("latency-lm", profile, overrides, {"teacher": teacher}, latency_model, metrics, device, parent_run_id)


@component
def search_lm(profile: str, overrides: dict, device: str, parent_run_id: str, supernet: Input[Model],
              latency_model: Input[Artifact], front: Output[Artifact], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("search-lm", profile, overrides, {"supernet": supernet, "latency": latency_model}, front, metrics,
              device, parent_run_id)


@component
def finalize_lm(profile: str, overrides: dict, device: str, parent_run_id: str, supernet: Input[Model],
                front: Input[Artifact], model: Output[Model], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("finalize-lm", profile, overrides, {"supernet": supernet, "search": front}, model, metrics, device,
              parent_run_id)


@component
def benchmark_lm(profile: str, overrides: dict, device: str, parent_run_id: str, model: Input[Model],
                 records: Output[Artifact], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("benchmark-lm", profile, overrides, {"model": model}, records, metrics, device, parent_run_id)


@component
def deploy_lm(profile: str, overrides: dict, device: str, parent_run_id: str, run_name: str, teacher: Input[Model],
              model: Input[Model], benchmark: Input[Artifact], deployment: Output[Artifact], metrics: Output[Metrics]):
    from components.runtime import run_stage

    run_stage("deploy-lm", profile, overrides, {"teacher": teacher, "model": model, "benchmark": benchmark},
              deployment, metrics, device, parent_run_id, run_name)


@component
def close_run(parent_run_id: str, summary: Output[Artifact],
              deployment: Optional[Input[Artifact]] = None,  # noqa: UP045 (kfp reads typing.Optional, not X | None)
              generation: Optional[Input[Artifact]] = None):  # noqa: UP045
    from components.runtime import close_run

    close_run(parent_run_id, summary, deployment, generation)


@component
def end_failed_run(run_name: str, status: dsl.PipelineTaskFinalStatus):
    from components.runtime import end_failed_run

    end_failed_run(run_name, status.state)
