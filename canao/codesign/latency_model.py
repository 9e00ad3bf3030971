"""The per-device, per-backend latency model, fitted on compiled subnets measured on the device;
each family (canao.qa.latency, canao.lm.latency) says how to build and time its subnets.

Sampled subnets (always the space's extremes: the largest, i.e. the teacher's shape, the
smallest, the deepest-thinnest and the shallowest-widest) are measured on the device. For each backend the model is

    latency = overhead + sum over op classes of (work of the class) x (fitted ms per unit)

with three op classes that the compiled code runs as different kernels: dense matmuls
(projections and FFN; FLOPs), attention matmuls (scores and weighted sum; FLOPs, quadratic
in the sequence length) and memory-bound elementwise work (LayerNorm, GELU, softmax,
residual adds; elements). The coefficients are fitted by non-negative least squares on the
measurements, so each is an effective cost of that kernel class as tuned for that device:
a compiler whose attention kernels are poor gets a large attention coefficient, which a
FLOPs count cannot express. Its error on held-out subnets (MAPE, Spearman rank correlation)
is reported beside the same figures for a FLOPs proxy (latency proportional to FLOPs, fitted
on the same measurements). The fitted model and the measurements are one artifact, tied
to the hardware they were measured on.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.optimize import nnls
from scipy.stats import spearmanr

from canao.hardware import check_same
from canao.lab import devices
from canao.manifest import read_manifest, reusable, write_manifest

MODEL_FILE = "latency_model.json"
MEASUREMENTS_FILE = "measurements.jsonl"  # one line per measured subnet, appended as measured (resumable)
FEATURES = ("overhead", "dense_flops", "attention_flops", "elementwise")


@dataclasses.dataclass(frozen=True)
class Family:
    """What the latency model needs to know of a family of subnets (each wing's latency module
    defines its own: canao.qa.latency.BERT_QA, canao.lm.latency.DECODER)."""

    name: str  # recorded in the model's file: "bert-qa", "decoder"
    subnet: type  # the subnet config type (from_dict, to_dict, label)
    shape: type  # the teacher's shape type
    features: Callable  # (subnet, teacher, seq_len) -> work of each FEATURES op class
    flops: Callable  # (subnet, teacher, seq_len) -> FLOPs: the compiler-unaware proxy


@dataclasses.dataclass
class LatencyModel:
    device: str  # device key the measurements were taken on
    seq_len: int  # sequence length of every measurement (decoder: the KV cache's length, the context)
    teacher: object  # the family's shape of the teacher
    coefficients: dict[str, list[float]]  # backend -> ms per unit of each FEATURES entry
    measurements: list[dict]  # {"subnet": {...}, "ms": {backend: p50 ms (decoder: ms/token)}, "heldout": bool}
    error: dict  # backend -> held-out MAPE and Spearman of this model and of the FLOPs proxy
    family: Family  # which subnets, features and FLOPs proxy (the file records its name)
    hardware: dict | None = None  # canao.hardware.Hardware of the device when measured; None in older models

    def predict(self, subnet, backend: str) -> float:
        if backend not in self.coefficients:
            raise ValueError(f"backend {backend!r}: no latency model (have {', '.join(self.coefficients)})")
        x = self.family.features(subnet, self.teacher, self.seq_len)
        return float(x @ np.asarray(self.coefficients[backend]))

    def measured(self, subnet) -> dict[str, float]:
        """The ms by backend measured for `subnet` (one of the timed samples, e.g. the teacher's shape)."""
        return next(m["ms"] for m in self.measurements if m["subnet"] == subnet.to_dict())

    def fastest(self, subnet) -> tuple[float, str]:
        """The predicted latency of what would be deployed: the fastest backend for this subnet."""
        return min((self.predict(subnet, b), b) for b in self.coefficients)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MODEL_FILE
        data = {**dataclasses.asdict(self), "family": self.family.name}
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path, family: Family) -> LatencyModel:
        """The latency model in `directory`, which must be one of `family`'s subnets."""
        path = Path(directory) / MODEL_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no latency model (run `canao latency`)") from None
        recorded = data.get("family", "bert-qa")
        if recorded != family.name:
            raise ValueError(f"{directory}: a latency model of {recorded} subnets, not of {family.name} subnets")
        return cls(**{**data, "teacher": family.shape(**data["teacher"]), "family": family})

    @classmethod
    def fit(cls, device: str, seq_len: int, teacher, measurements: list[dict], family: Family,
            hardware: dict | None = None) -> LatencyModel:
        """Fit every backend on the measurements not held out; score on those held out."""
        kind = family
        train = [m for m in measurements if not m["heldout"]]
        test = [m for m in measurements if m["heldout"]]
        coefficients, error = {}, {}

        def design(rows, work):
            return np.array([work(kind.subnet.from_dict(m["subnet"]), teacher, seq_len) for m in rows], dtype=float)

        x_train, x_test = design(train, kind.features), design(test, kind.features)
        flops_train, flops_test = design(train, kind.flops), design(test, kind.flops)
        for backend in measurements[0]["ms"]:
            y_train = np.array([m["ms"][backend] for m in train])
            y_test = np.array([m["ms"][backend] for m in test])
            scale = np.abs(x_train).max(axis=0)  # columns differ by 10 orders of magnitude
            scale[scale == 0] = 1.0
            solution, _ = nnls(x_train / scale, y_train)
            coefficients[backend] = (solution / scale).tolist()
            per_flop = float(flops_train @ y_train / (flops_train @ flops_train))
            error[backend] = {"model": _error(x_test @ (solution / scale), y_test),
                              "flops_proxy": _error(flops_test * per_flop, y_test),
                              "fitted_on": len(train), "heldout": len(test)}
        return cls(device, seq_len, teacher, coefficients, measurements, error, family, hardware)


def _error(predicted: np.ndarray, measured: np.ndarray) -> dict:
    mape = float(np.mean(np.abs(predicted - measured) / measured) * 100)
    # With two held-out subnets the rank correlation only says whether their order is right.
    rho = float(spearmanr(predicted, measured).statistic) if len(measured) >= 2 else float("nan")
    return {"mape_pct": round(mape, 2), "spearman": round(rho, 3) if rho == rho else None}


def sample_subnets(space, samples: int, seed: int) -> list:
    """`space.extremes()` (a wing's search space: the largest, the smallest, the deepest-thinnest,
    the shallowest-widest), then distinct random subnets."""
    rng = random.Random(seed)
    chosen = space.extremes()[:samples]
    for _ in range(1000 * samples):
        if len(chosen) == samples:
            return chosen
        subnet = space.sample(rng)
        if subnet not in chosen:
            chosen.append(subnet)
    raise ValueError(f"samples: the space holds fewer than {samples} distinct subnets")


def measure_and_fit(out_dir: Path, fingerprint: str, device: devices.Device, seq_len: int, teacher, family: Family,
                     subnets: list, holdout: int, measure_one: Callable[[object, Path], dict[str, float]],
                     config: dict, inputs: dict, reuse_other_hardware: bool) -> dict:
    """Measure `subnets` (the last `holdout` held out) with `measure_one(subnet, scratch dir)`,
    fit the latency model of every backend and write it, its measurements and a manifest to
    `out_dir`. Measurements are appended to `out_dir/measurements.jsonl` as they are taken: a
    run that is cut short resumes where it stopped. A finished model or measurements taken on
    other hardware than `device`'s are refused unless `reuse_other_hardware`."""
    hardware = device.hardware()
    existing = read_manifest(out_dir)
    if existing is not None:
        check_same(existing.get("hardware"), hardware, f"{out_dir}: latency model", reuse_other_hardware)
    existing = reusable(out_dir, fingerprint, "latency model")
    if existing is not None:
        return existing
    heldout = set(range(len(subnets) - holdout, len(subnets)))
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / MEASUREMENTS_FILE
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if done and done[0].get("fingerprint") != fingerprint:
        raise FileExistsError(f"{log}: measurements of another config; choose another --out")
    if done:
        check_same(done[0].get("hardware"), hardware, f"{log}: measurements", reuse_other_hardware)
    started = time.perf_counter()
    for i, subnet in enumerate(subnets[len(done):], start=len(done)):
        t0 = time.perf_counter()
        ms = measure_one(subnet, out_dir / "work")
        row = {"fingerprint": fingerprint, "hardware": hardware.to_dict(), "subnet": subnet.to_dict(), "ms": ms,
               "heldout": i in heldout}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        done.append(row)
        print(f"latency {i + 1}/{len(subnets)}: {subnet.label()}: "
              f"{', '.join(f'{b} {v:.2f} ms' for b, v in ms.items())} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model = LatencyModel.fit(device.key, seq_len, teacher,
                             [{k: m[k] for k in ("subnet", "ms", "heldout")} for m in done], family, hardware.to_dict())
    model.save(out_dir)
    log.unlink()
    metrics = {"error": model.error, "measure_seconds": round(time.perf_counter() - started, 1),
               "samples": len(subnets)}
    return write_manifest(out_dir, "latency", {"device": device.key, **config}, metrics, inputs,
                          config_hash=fingerprint, family=family.name, hardware=hardware.to_dict())
