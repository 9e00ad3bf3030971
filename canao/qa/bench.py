"""bench: a compiled QA artifact timed on a device in every backend under one protocol:
warm-up, repeated timed runs, p50/p90/min.

The TVM module runs on the device through the lab's tracker (`time_evaluator` on the
device server, pinned to the device's cores with its thread count). The peers (LiteRT,
ONNX Runtime, PyTorch) run on this machine in a fresh process pinned to the same cores
with the same thread count, so every backend gets the same hardware. Inputs are the same
deterministic windows for all, and every record carries its numerics difference from
PyTorch fp32 and the hardware it was measured on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from canao.compile import peers
from canao.lab import rpc
from canao.lab.devices import Device
from canao.manifest import verify_manifest
from canao.processes import call_in_child
from canao.qa.config import BenchConfig
from canao.qa.model import example_inputs
from canao.qa.predictor import runner_factory

BACKENDS = ("tvm", "litert", "litert-int8", "onnxruntime", "onnxruntime-int8", "torch")
BASELINE = "litert"  # speedups are relative to LiteRT fp32, the strongest fp32 peer on CPUs


@dataclass(frozen=True)
class Record:
    backend: str
    device: str
    seq_len: int
    p50_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    threads: int
    cores: tuple[int, ...]
    version: str  # backend version string
    numerics_max_abs_diff: float  # max |start/end logits - PyTorch fp32|
    hardware: str  # canao.hardware.Hardware.label() of the device: which CPU the figure comes from


def summarize(times_ms: list[float]) -> dict:
    t = np.asarray(times_ms)
    return {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min())}


def bench(artifact_dir: str | Path, model_dir: str | Path, device: Device, backends: tuple[str, ...],
          cfg: BenchConfig) -> list[Record]:
    """Time `backends` of a compiled artifact directory on `device`."""
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    artifact_dir = Path(artifact_dir)
    manifest = verify_manifest(artifact_dir)
    if manifest["config"]["device"] != device.key:
        raise ValueError(f"{artifact_dir}: compiled for {manifest['config']['device']}, not for {device.key}")
    missing = sorted(set(backends) - set(manifest["backends"]) - {"torch"})
    if missing:
        raise ValueError(f"{artifact_dir}: has no {', '.join(missing)} export (compile it with those peers)")
    seq_len = manifest["config"]["seq_len"]
    numerics = manifest["metrics"]["numerics_max_abs_diff"]
    inputs = [t.numpy() for t in example_inputs(seq_len)]  # every backend times the same windows
    records = []
    for backend in backends:
        if backend == "tvm":
            times = rpc.time_remote(artifact_dir / manifest["backends"]["tvm"], inputs, device.key,
                                           cfg.warmup, cfg.runs)
            version = _tvm_version()
        else:
            path = Path(model_dir) if backend == "torch" else artifact_dir / manifest["backends"][backend]
            times, version = call_in_child(f"timing {backend}", peers.timed_calls, device,
                                           runner_factory(backend, path, device.threads), inputs, cfg.warmup,
                                           cfg.runs)
        records.append(Record(
            backend=backend, device=device.key, seq_len=seq_len, runs=len(times), threads=device.threads,
            cores=tuple(device.cores), version=version, numerics_max_abs_diff=numerics.get(backend, 0.0),
            hardware=device.hardware().label(), **summarize(times),
        ))
    return records


def timed_in_turn(targets: dict[str, tuple[Path, Path]], device: Device, backends: tuple[str, ...],
                  cfg: BenchConfig, rounds: int, backends_of: dict[str, tuple[str, ...]] | None = None,
                  ) -> dict[str, list[dict[str, float]]]:
    """`targets` (name -> (compiled artifact directory, model directory)) timed in turn, `rounds`
    times over, every timing in a process of its own: name -> one {backend: p50 ms} per round.
    Each is timed on `backends`, or on what `backends_of` names for it. One process's p50 differs
    from the next one's by up to ~20 % on a shared 2-core machine (an int8 student's read 7.9 to
    9.6 ms over eight rounds, 2026-12-07), far more than within a process; a decision on one
    timing flips with it. `median_ms`, `speedup` and `in_frame_of` reduce the rounds."""
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (artifact_dir, model_dir) in targets.items():
            timed_on = (backends_of or {}).get(name, backends)
            timings[name].append({r.backend: r.p50_ms for r in bench(artifact_dir, model_dir, device, timed_on, cfg)})
    return timings


def median_ms(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each backend's median p50 over the rounds of `timed_in_turn`."""
    return {backend: float(np.median([r[backend] for r in rounds])) for backend in rounds[0]}


def paired_ratios(reference: list[dict[str, float]], reference_backend: str, model: list[dict[str, float]],
                  backend: str) -> list[float]:
    """Each round's `reference` ms over `model`'s: two timings taken in the same round (back to
    back), so a slow stretch of the machine slows both."""
    return [r[reference_backend] / m[backend] for r, m in zip(reference, model, strict=True)]


def speedup(reference: list[dict[str, float]], reference_backend: str, model: list[dict[str, float]],
            backend: str) -> float:
    """The median of `paired_ratios`."""
    return float(np.median(paired_ratios(reference, reference_backend, model, backend)))


def in_frame_of(reference: list[dict[str, float]], reference_backend: str, reference_ms: float,
                model: list[dict[str, float]]) -> dict[str, float]:
    """`model`'s ms on each backend as they would read where `reference` (timed in the same rounds)
    reads `reference_ms` on `reference_backend`: `reference_ms` over the `speedup`. A budget made
    from one timing of the reference thus judges timings made hours later on a machine that runs
    faster or slower by then (the full run's whole machine ran 17 % faster one day than the day before)."""
    return {backend: reference_ms / speedup(reference, reference_backend, model, backend) for backend in model[0]}


def _tvm_version() -> str:
    import tvm

    return f"tvm {tvm.__version__}"


def table(records: list[Record]) -> str:
    """Markdown table with each backend's speedup over LiteRT fp32 on the same device and length."""
    base = {(r.device, r.seq_len): r.p50_ms for r in records if r.backend == BASELINE}
    lines = ["| device | seq | backend | p50 ms | p90 ms | min ms | vs LiteRT fp32 | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        ref = base.get((r.device, r.seq_len))
        speedup = f"{ref / r.p50_ms:.2f}x" if ref else "n/a"
        lines.append(f"| {r.device} | {r.seq_len} | {r.backend} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | "
                     f"{r.min_ms:.2f} | {speedup} | {r.numerics_max_abs_diff:.1e} |")
    return "\n".join(lines)
