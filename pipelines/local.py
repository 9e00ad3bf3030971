"""`make run`: `canao-compress` on this machine with kfp's SubprocessRunner.

Starts what the pipeline needs and is not running yet (the MLflow server and SeaweedFS S3
store of canao/mlops/services.py, the device lab), runs the pipeline (each task a subprocess in
this environment, the image's content), writes the summary to `outputs/latest/summary.json`
and stops what it started, also when stopped by Ctrl-C or SIGTERM. Finished stages are reused
from the content-hash cache (outputs/cache/), so running it again after a failure resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import kfp.local

from canao.config import PROFILES, resolve_path
from canao.lab import devices, rpc
from canao.mlops import services, tracking
from components.runtime import SUMMARY as SUMMARY_FILE
from pipelines.canao_compress import APPS, local_pipeline

SUMMARY = "outputs/latest/summary.json"
PIPELINE_ROOT = "outputs/pipeline-runs"


@contextlib.contextmanager
def running_services(mlflow_port: int = services.MLFLOW_PORT, s3_port: int = services.S3_PORT,
                     lab_port: int = rpc.DEFAULT_PORT):
    """The embedded services and the device lab, with their client environment set; what this
    started is stopped on exit (what was already running stays)."""
    started_services = services.read_state() is None
    started_lab = rpc.read_state() is None and not os.environ.get("CANAO_TRACKER")
    try:
        with _stop_signals_held():
            state = services.up(mlflow_port, s3_port, avoid=(lab_port,))
            if started_lab:
                rpc.up(port=lab_port)
        os.environ.update(services.env(state))
        yield state
    finally:
        if started_lab:
            rpc.down()
        if started_services:
            services.down()


_held_signals: list[int] | None = None  # stop signals received while servers start, or None when none start


def _on_stop_signal(signum: int, _frame) -> None:
    if _held_signals is not None:
        _held_signals.append(signum)
        return
    _stop(signum)


def _stop(signum: int) -> None:
    # SIGTERM (`kill`, a scheduler's stop) would end the process without unwinding; as SystemExit
    # it goes through running_services' `finally`, like Ctrl-C, and the services it started stop.
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


@contextlib.contextmanager
def _stop_signals_held():
    """Ctrl-C or SIGTERM while servers start is acted on once starting has ended: raised inside
    `Popen` or just after it, the child would run on unrecorded, out of reach of the `finally`
    that stops what was started (a device-lab tracker outlived `make run` so)."""
    global _held_signals
    _held_signals = []
    try:
        yield
    finally:
        held, _held_signals = _held_signals, None
        if held:
            _stop(held[0])


def run(profile: str, device: str, latency_budgets_ms: list[float], overrides: dict[str, list[str]],
        pipeline_root: Path, summary_path: Path | None, apps: tuple[str, ...] = APPS) -> dict:
    """Run the pipeline, making `apps`' chains, with kfp.local in this environment (services must
    be up); returns the summary."""
    run_name = f"canao-compress-{profile}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
                   raise_on_error=True)
    # kfp warns that the tasks' base image is not Python's; this environment is that image's content.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
    try:
        task = local_pipeline(apps)(device=device, profile=profile, latency_budgets_ms=latency_budgets_ms,
                              run_name=run_name, overrides=overrides)
    except BaseException:
        _mark_failed(run_name)
        raise
    # the pipeline's output artifact: close_run's summary of both deployments
    summary = json.loads((Path(task.output.path) / SUMMARY_FILE).read_text())
    # The deployments may come from the cache (an earlier run); the MLflow run is this run's.
    run_id = tracking.find_pipeline_run(run_name)
    summary.update(pipeline_run=run_name, profile=profile, mlflow_run_id=run_id, mlflow_url=tracking.run_url(run_id))
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _mark_failed(run_name: str) -> None:
    """The pipeline's MLflow run, if it was opened, ends FAILED rather than RUNNING forever."""
    try:
        tracking.end_run(tracking.find_pipeline_run(run_name), "FAILED")
    except tracking.TrackingError:
        pass  # the run was never opened (or MLflow is gone): nothing to mark


def _times(speedup: float | None) -> str:
    return f"{speedup:.2f}x" if speedup else "n/a"


def describe(summary: dict) -> str:
    lines = _describe_qa(summary) if "student" in summary else []
    if "generation" in summary:
        lines += _describe_generation(summary["generation"])
    return "\n".join([*lines, f"mlflow       {summary['mlflow_url']}"])


def _describe_qa(summary: dict) -> list[str]:
    teacher, student, backend = summary["teacher"], summary["student"], summary["backend"]
    model = summary["mlflow_model"]
    speedup = summary["speedup_vs_litert_fp32_teacher"]
    return [
        f"teacher      EM {teacher['exact_match']:.2f}  F1 {teacher['f1']:.2f}  ({teacher['dir']})",
        f"student      EM {student['exact_match']:.2f}  F1 {student['f1']:.2f}  {student['config']}, "
        f"{student['params'] / 1e6:.1f}M params, {student['flops'] / 1e9:.2f} GFLOPs at {student['seq_len']} tokens",
        f"front        {summary['front']}",
        f"device       {summary['device']}: {backend['backend']} p50 {backend['p50_ms']:.2f} ms, "
        f"{_times(speedup)} vs LiteRT fp32 teacher",
        f"registry     {summary['registry_uri']}",
        f"alias        {'moved' if model['promoted'] else 'not moved'}: {model['reason']}",
        *(f"budget {s['budget']:<6} {kind}: {s['backend']} F1 {s['f1']:.2f}, "
          f"{_times(s['speedup_vs_litert_fp32_teacher'])} vs LiteRT fp32 teacher"
          for kind, entries in (("searched", summary.get("students", [])), ("baseline", summary.get("baseline", [])))
          for s in entries),
    ]


def _describe_generation(generation: dict) -> list[str]:
    teacher, student, model = generation["teacher"], generation["student"], generation["mlflow_model"]
    return [
        f"generation   teacher perplexity {teacher['perplexity']:.2f}, llama.cpp {teacher['ms_per_token']:.2f} "
        f"ms/token ({teacher['gguf']})",
        f"             student perplexity {student['perplexity']:.2f}, {student['backend']} "
        f"{student['ms_per_token']:.2f} ms/token, {_times(student['speedup_vs_llamacpp_teacher'])} vs llama.cpp "
        f"teacher, {student['config']}",
        f"             {generation['registry_uri']}; alias {'moved' if model['promoted'] else 'not moved'}: "
        f"{model['reason']}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--device", default="x86-1t", help="device key from device_lab/devices.yaml")
    parser.add_argument("--budget-ms", type=float, action="append", dest="budgets",
                        help="latency budget in ms (repeatable); the search meets the tightest of these "
                             "and of the profile's own (configs/<profile>/search.yaml)")
    parser.add_argument("--mlflow-port", type=int, default=services.MLFLOW_PORT, help="if not running yet")
    parser.add_argument("--s3-port", type=int, default=services.S3_PORT, help="if not running yet")
    parser.add_argument("--lab-port", type=int, default=rpc.DEFAULT_PORT, help="tracker, if not running")
    parser.add_argument("--app", dest="apps", action="append", choices=APPS,
                        help="a chain to run (repeatable; default: all of them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE:KEY=VALUE",
                        help="override one config value of one stage, e.g. compile:trials=0")
    args = parser.parse_args(argv)
    overrides: dict[str, list[str]] = {}
    for item in args.overrides:
        stage, sep, override = item.partition(":")
        if not sep:
            parser.error(f"--set {item}: expected STAGE:KEY=VALUE")
        overrides.setdefault(stage, []).append(override)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)
    try:
        with running_services(args.mlflow_port, args.s3_port, args.lab_port):
            summary = run(args.profile, args.device, args.budgets or [], overrides,
                          resolve_path(PIPELINE_ROOT), resolve_path(SUMMARY), tuple(args.apps or APPS))
    except (services.ServiceError, devices.DeviceLabError, tracking.TrackingError) as e:
        print(f"canao-compress: error: {e}", file=sys.stderr)
        return 2
    print(describe(summary))
    print(f"summary: {resolve_path(SUMMARY)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
