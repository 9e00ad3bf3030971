"""`canao submit`: run `canao-compress` on a Kubeflow Pipelines endpoint (it appears in the UI)."""

from __future__ import annotations

import datetime

import kfp
import urllib3.exceptions

from pipelines.canao_compress import canao_compress_on_cluster


def submit(host: str, experiment: str, profile: str, device: str, latency_budgets_ms: list[float]) -> dict:
    run_name = f"canao-compress-{profile}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"
    try:
        client = kfp.Client(host=host)
    except urllib3.exceptions.HTTPError as e:
        raise ConnectionError(f"--host {host}: no Kubeflow Pipelines API answers there ({e.__class__.__name__}: "
                              f"{getattr(e, 'reason', e)})") from None
    result = client.create_run_from_pipeline_func(
        canao_compress_on_cluster, experiment_name=experiment, run_name=run_name,
        arguments={"device": device, "profile": profile, "latency_budgets_ms": latency_budgets_ms,
                   "run_name": run_name},
    )
    return {"run_id": result.run_id, "run_name": run_name, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}
