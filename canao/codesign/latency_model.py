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

A family may time more than one latency of each subnet (its `metrics`: the decoder's ms per
generated token and its time to first token); each gets a model of its own, on the work of
what it times, fitted on the same measurements and written in the same file.
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
class Metric:
    """A latency a family times on every sampled subnet, and the work its model is fitted on."""

    key: str  # its field in every measurement ({backend: ms}); a family's first is "ms", as in files of one metric
    features: Callable  # (subnet, teacher, seq_len) -> work of each FEATURES op class
    flops: Callable  # (subnet, teacher, seq_len) -> FLOPs: the compiler-unaware proxy


@dataclasses.dataclass(frozen=True)
class Family:
    """What the latency model needs to know of a family of subnets (each wing's latency module
    defines its own: canao.qa.latency.BERT_QA, canao.lm.latency.DECODER)."""

    name: str  # recorded in the model's file: "bert-qa", "decoder"
    subnet: type  # the subnet config type (from_dict, to_dict, label)
    shape: type  # the teacher's shape type
    metrics: tuple[Metric, ...]  # what each subnet is timed for, each with a model; the first's is the file's own

    def metric(self, key: str) -> Metric:
        for metric in self.metrics:
            if metric.key == key:
                return metric
        raise ValueError(f"{key!r}: {self.name} subnets are timed for {', '.join(m.key for m in self.metrics)}")


# What the file holds of each of a family's further metrics (`LatencyModel.others`): the rest is shared.
OWN_FIELDS = ("seq_len", "coefficients", "error")


@dataclasses.dataclass
class LatencyModel:
    """The model of one of a family's metrics; the file's (its first metric's) holds the others'."""

    device: str  # device key the measurements were taken on
    # tokens the work is counted at: those of every measurement (QA: the sequence; decoder: the KV
    # cache's length, the context, for ms per token; the prompt's for the time to first token)
    seq_len: int
    teacher: object  # the family's shape of the teacher
    coefficients: dict[str, list[float]]  # backend -> ms per unit of each FEATURES entry
    # {"subnet": {...}, each metric's key: {backend: ms}, "heldout": bool}; QA's "ms": p50 ms;
    # the decoder's "ms": ms per generated token, "time_to_first_token_ms": prompt + first token
    measurements: list[dict]
    error: dict  # backend -> held-out MAPE and Spearman of this model and of the FLOPs proxy
    family: Family  # which subnets, features and FLOPs proxy (the file records its name)
    hardware: dict | None = None  # canao.hardware.Hardware of the device when measured; None in older models
    metric: str = "ms"  # which of the family's metrics this model predicts (older files: their only one, "ms")
    # the models of the family's other metrics, fitted on the same measurements (see `of`)
    others: dict[str, LatencyModel] = dataclasses.field(default_factory=dict)

    def of(self, metric: str) -> LatencyModel:
        """The model of the family's `metric`: this one or one of its `others`."""
        if metric == self.metric:
            return self
        if metric not in self.others:
            raise ValueError(f"{metric!r}: the latency model predicts {', '.join([self.metric, *self.others])}")
        return self.others[metric]

    def predict(self, subnet, backend: str) -> float:
        if backend not in self.coefficients:
            raise ValueError(f"backend {backend!r}: no latency model (have {', '.join(self.coefficients)})")
        x = self.family.metric(self.metric).features(subnet, self.teacher, self.seq_len)
        return float(x @ np.asarray(self.coefficients[backend]))

    def measured(self, subnet) -> dict[str, float]:
        """The ms by backend measured for `subnet` (one of the timed samples, e.g. the teacher's shape)."""
        return next(m[self.metric] for m in self.measurements if m["subnet"] == subnet.to_dict())

    def fastest(self, subnet) -> tuple[float, str]:
        """The predicted latency of what would be deployed: the fastest backend for this subnet."""
        return min((self.predict(subnet, b), b) for b in self.coefficients)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MODEL_FILE
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(teacher=dataclasses.asdict(self.teacher), family=self.family.name,
                    others={k: {f: getattr(m, f) for f in OWN_FIELDS} for k, m in self.others.items()})
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
        others = data.pop("others", {})
        model = cls(**{**data, "teacher": family.shape(**data["teacher"]), "family": family})
        model.others = {key: dataclasses.replace(model, metric=key, **fit) for key, fit in others.items()}
        missing = [m.key for m in family.metrics if m.key not in (model.metric, *model.others)]
        if missing:
            raise ValueError(f"{directory}: a latency model without {', '.join(missing)} (made before it was "
                             "timed); run the latency stage again into a new directory")
        return model

    @classmethod
    def fit_family(cls, device: str, seq_lens: dict[str, int], teacher, measurements: list[dict], family: Family,
                   hardware: dict | None = None) -> LatencyModel:
        """The model of each of `family`'s metrics at its length in `seq_lens` (metric key -> tokens):
        the first's, holding the others'."""
        first, *others = (cls.fit(device, seq_lens[m.key], teacher, measurements, family, hardware, m.key)
                          for m in family.metrics)
        first.others = {model.metric: model for model in others}
        return first

    @classmethod
    def fit(cls, device: str, seq_len: int, teacher, measurements: list[dict], family: Family,
            hardware: dict | None = None, metric: str | None = None) -> LatencyModel:
        """The model of `metric` (default: the family's first): every backend fitted on the
        measurements not held out, scored on those held out."""
        metric = metric or family.metrics[0].key
        quantity = family.metric(metric)
        train = [m for m in measurements if not m["heldout"]]
        test = [m for m in measurements if m["heldout"]]
        coefficients, error = {}, {}

        def design(rows, work):
            return np.array([work(family.subnet.from_dict(m["subnet"]), teacher, seq_len) for m in rows],
                            dtype=float)

        x_train, x_test = design(train, quantity.features), design(test, quantity.features)
        flops_train, flops_test = design(train, quantity.flops), design(test, quantity.flops)
        for backend in measurements[0][metric]:
            y_train = np.array([m[metric][backend] for m in train])
            y_test = np.array([m[metric][backend] for m in test])
            scale = np.abs(x_train).max(axis=0)  # columns differ by 10 orders of magnitude
            scale[scale == 0] = 1.0
            solution, _ = nnls(x_train / scale, y_train)
            coefficients[backend] = (solution / scale).tolist()
            per_flop = float(flops_train @ y_train / (flops_train @ flops_train))
            error[backend] = {"model": _error(x_test @ (solution / scale), y_test),
                              "flops_proxy": _error(flops_test * per_flop, y_test),
                              "fitted_on": len(train), "heldout": len(test)}
        return cls(device, seq_len, teacher, coefficients, measurements, error, family, hardware, metric)


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


def measure_and_fit(out_dir: Path, fingerprint: str, device: devices.Device, seq_lens: dict[str, int], teacher,
                     family: Family, subnets: list, holdout: int,
                     measure_one: Callable[[object, Path], dict[str, dict[str, float]]], config: dict, inputs: dict,
                     reuse_other_hardware: bool) -> dict:
    """Measure `subnets` (the last `holdout` held out) with `measure_one(subnet, scratch dir)` ->
    {metric key: {backend: ms}} for each of the family's metrics, fit the latency model of every
    metric (at its length in `seq_lens`) and backend and write it, its measurements and a
    manifest to `out_dir`. Measurements are appended to `out_dir/measurements.jsonl` as they
    are taken: a run that is cut short resumes where it stopped. A finished model or
    measurements taken on other hardware than `device`'s are refused unless `reuse_other_hardware`."""
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
    keys = [m.key for m in family.metrics]
    started = time.perf_counter()
    for i, subnet in enumerate(subnets[len(done):], start=len(done)):
        t0 = time.perf_counter()
        timed = measure_one(subnet, out_dir / "work")
        row = {"fingerprint": fingerprint, "hardware": hardware.to_dict(), "subnet": subnet.to_dict(),
               **{key: timed[key] for key in keys}, "heldout": i in heldout}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        done.append(row)
        figures = "; ".join(f"{key}: " + ", ".join(f"{b} {v:.2f} ms" for b, v in timed[key].items()) for key in keys)
        print(f"latency {i + 1}/{len(subnets)}: {subnet.label()}: {figures} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    model = LatencyModel.fit_family(device.key, seq_lens, teacher,
                                    [{k: m[k] for k in ("subnet", *keys, "heldout")} for m in done], family,
                                    hardware.to_dict())
    model.save(out_dir)
    log.unlink()
    # the first metric's error as "error" (as with one metric), each other's as "<key>_error"
    errors = {"error": model.error, **{f"{key}_error": m.error for key, m in model.others.items()}}
    metrics = {**errors, "measure_seconds": round(time.perf_counter() - started, 1), "samples": len(subnets)}
    return write_manifest(out_dir, "latency", {"device": device.key, **config}, metrics, inputs,
                          config_hash=fingerprint, family=family.name, hardware=hardware.to_dict())
