"""`canao submit`: run `canao-compress` on a Kubeflow Pipelines endpoint (it appears in the UI)."""

from __future__ import annotations

import datetime

import kfp

from pipelines.canao_compress import canao_compress


def submit(host: str, experiment: str, profile: str, device: str, latency_budgets_ms: list[float]) -> dict:
    run_name = f"canao-compress-{profile}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"
    client = kfp.Client(host=host)
    result = client.create_run_from_pipeline_func(
        canao_compress, experiment_name=experiment, run_name=run_name,
        arguments={"device": device, "profile": profile, "latency_budgets_ms": latency_budgets_ms,
                   "run_name": run_name},
    )
    return {"run_id": result.run_id, "run_name": run_name, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}
