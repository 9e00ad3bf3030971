"""The per-device, per-backend latency model, fitted on compiled subnets measured on the device.

Sampled subnets (always the largest, i.e. the teacher's shape, and the smallest) are built
with random weights (latency depends on the shape only), compiled by the compiler stage
(TVM, tuned through the device's shared tuning database, plus the peer exports), and timed
on the device through the lab with the benchmark protocol. For each backend the model is

    latency = overhead + sum over op classes of (work of the class) x (fitted ms per unit)

with three op classes that the compiled code runs as different kernels: dense matmuls
(projections and FFN; FLOPs), attention matmuls (scores and weighted sum; FLOPs, quadratic
in the sequence length) and memory-bound elementwise work (LayerNorm, GELU, softmax,
residual adds; elements). The coefficients are fitted by non-negative least squares on the
measurements, so each is an effective cost of that kernel class as tuned for that device:
a compiler whose attention kernels are poor gets a large attention coefficient, which a
FLOPs count cannot express. Its error on held-out subnets (MAPE, Spearman rank correlation)
is reported beside the same figures for a FLOPs proxy (latency proportional to FLOPs, fitted
on the same measurements). The fitted model and the measurements are one artifact.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls
from scipy.stats import spearmanr
from transformers import BertConfig

from canao.config import BenchConfig, CompileConfig, LatencyConfig, config_hash, to_dict
from canao.manifest import reusable, write_manifest
from canao.models.bert_qa import load_tokenizer
from canao.models.modeling_canao_bert import CanaoBertForQuestionAnswering
from canao.models.supernet import subnet_config
from canao.space import SearchSpace, SubnetConfig, TeacherShape, flops

MODEL_FILE = "latency_model.json"
MEASUREMENTS_FILE = "measurements.jsonl"  # one line per measured subnet, appended as measured (resumable)
FEATURES = ("overhead", "dense_flops", "attention_flops", "elementwise")


def features(subnet: SubnetConfig, teacher: TeacherShape, seq_len: int) -> np.ndarray:
    """Work of each op class (FEATURES) of one forward pass at `seq_len` tokens."""
    h, d, s = subnet.hidden_size, teacher.head_size, seq_len
    dense = attention = elementwise = 0.0
    for a, f in zip(subnet.heads, subnet.ffn_sizes, strict=True):
        w = a * d
        dense += 2 * s * h * (4 * w + 2 * f)
        attention += 4 * s * s * w
        elementwise += a * s * s + s * f + 4 * s * h  # softmax, GELU, two LayerNorms and residual adds
    return np.array([1.0, dense, attention, elementwise])


@dataclasses.dataclass
class LatencyModel:
    device: str  # device key the measurements were taken on
    seq_len: int  # sequence length of every measurement
    teacher: TeacherShape
    coefficients: dict[str, list[float]]  # backend -> ms per unit of each FEATURES entry
    measurements: list[dict]  # {"subnet": {...}, "ms": {backend: p50 ms}, "heldout": bool}
    error: dict  # backend -> held-out MAPE and Spearman of this model and of the FLOPs proxy

    def predict(self, subnet: SubnetConfig, backend: str) -> float:
        if backend not in self.coefficients:
            raise ValueError(f"backend {backend!r}: no latency model (have {', '.join(self.coefficients)})")
        return float(features(subnet, self.teacher, self.seq_len) @ np.asarray(self.coefficients[backend]))

    def fastest(self, subnet: SubnetConfig) -> tuple[float, str]:
        """The predicted latency of what would be deployed: the fastest backend for this subnet."""
        return min((self.predict(subnet, b), b) for b in self.coefficients)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MODEL_FILE
        data = dataclasses.asdict(self)
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LatencyModel:
        path = Path(directory) / MODEL_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no latency model (run `canao latency`)") from None
        data["teacher"] = TeacherShape(**data["teacher"])
        return cls(**data)

    @classmethod
    def fit(cls, device: str, seq_len: int, teacher: TeacherShape, measurements: list[dict]) -> LatencyModel:
        """Fit every backend on the measurements not held out; score on those held out."""
        train = [m for m in measurements if not m["heldout"]]
        test = [m for m in measurements if m["heldout"]]
        coefficients, error = {}, {}

        def design(rows):
            return np.stack([features(SubnetConfig.from_dict(m["subnet"]), teacher, seq_len) for m in rows])

        x_train, x_test = design(train), design(test)
        flops_train = np.array([flops(SubnetConfig.from_dict(m["subnet"]), teacher, seq_len) for m in train], float)
        flops_test = np.array([flops(SubnetConfig.from_dict(m["subnet"]), teacher, seq_len) for m in test], float)
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
        return cls(device, seq_len, teacher, coefficients, measurements, error)


def _error(predicted: np.ndarray, measured: np.ndarray) -> dict:
    mape = float(np.mean(np.abs(predicted - measured) / measured) * 100)
    # With two held-out subnets the rank correlation only says whether their order is right.
    rho = float(spearmanr(predicted, measured).statistic) if len(measured) >= 2 else float("nan")
    return {"mape_pct": round(mape, 2), "spearman": round(rho, 3) if rho == rho else None}


def measure(subnet: SubnetConfig, teacher_dir: Path, device_key: str, backends: tuple[str, ...],
            compile_cfg: CompileConfig, bench_cfg: BenchConfig, work_dir: Path) -> dict[str, float]:
    """p50 latency (ms) of `subnet` on the device for each backend: a random-weight model of its
    shape, compiled by the compiler stage (shared tuning database), timed with the benchmark
    protocol. `work_dir` is scratch space, removed afterwards."""
    from canao import bench
    from canao.compile import compile_model

    shutil.rmtree(work_dir, ignore_errors=True)
    model_dir = work_dir / "model"
    try:
        torch.manual_seed(0)
        CanaoBertForQuestionAnswering(subnet_config(BertConfig.from_pretrained(teacher_dir), subnet)).save_pretrained(
            model_dir)
        load_tokenizer(teacher_dir).save_pretrained(model_dir)
        cfg = dataclasses.replace(compile_cfg, peers=tuple(b for b in backends if b != "tvm"))
        compile_model(model_dir, device_key, cfg, work_dir / "compiled")
        records = bench.bench(work_dir / "compiled", model_dir, device_key, backends, bench_cfg)
        return {r.backend: round(r.p50_ms, 4) for r in records}
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def sample_subnets(space: SearchSpace, samples: int, seed: int) -> list[SubnetConfig]:
    """The largest, the smallest, then distinct random subnets."""
    rng = random.Random(seed)
    chosen = [space.largest(), space.smallest()]
    for _ in range(1000 * samples):
        if len(chosen) == samples:
            return chosen
        subnet = space.sample(rng)
        if subnet not in chosen:
            chosen.append(subnet)
    raise ValueError(f"samples: the space holds fewer than {samples} distinct subnets")


def fit_latency_model(cfg: LatencyConfig, device_key: str, out_dir: str | Path, teacher_dir: str | Path) -> dict:
    """Measure `cfg.samples` subnets of the teacher on `device_key` (the device lab must be up),
    fit the latency model of every backend, and write it with its measurements to `out_dir`.
    Measurements are appended to `out_dir/measurements.jsonl` as they are taken: a run that
    is cut short resumes where it stopped."""
    from canao import device_lab

    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    device = device_lab.get_device(device_key)
    teacher = TeacherShape.of(BertConfig.from_pretrained(teacher_dir))
    fingerprint = config_hash(cfg) + f"-{device.key}-" + config_hash(teacher)
    existing = reusable(out_dir, fingerprint, "latency model")
    if existing is not None:
        return existing
    space = SearchSpace(cfg.space, teacher)
    subnets = sample_subnets(space, cfg.samples, cfg.seed)
    heldout = set(range(cfg.samples - cfg.holdout, cfg.samples))
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / MEASUREMENTS_FILE
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if done and done[0].get("fingerprint") != fingerprint:
        raise FileExistsError(f"{log}: measurements of another config; choose another --out")
    started = time.perf_counter()
    for i, subnet in enumerate(subnets[len(done):], start=len(done)):
        t0 = time.perf_counter()
        ms = measure(subnet, teacher_dir, device.key, cfg.backends, cfg.compile, cfg.bench, out_dir / "work")
        row = {"fingerprint": fingerprint, "subnet": subnet.to_dict(), "ms": ms, "heldout": i in heldout}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        done.append(row)
        print(f"latency {i + 1}/{cfg.samples}: {subnet.label()}: "
              f"{', '.join(f'{b} {v:.2f} ms' for b, v in ms.items())} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model = LatencyModel.fit(device.key, cfg.compile.seq_len, teacher,
                             [{k: m[k] for k in ("subnet", "ms", "heldout")} for m in done])
    model.save(out_dir)
    log.unlink()
    metrics = {"error": model.error, "measure_seconds": round(time.perf_counter() - started, 1),
               "samples": cfg.samples}
    return write_manifest(out_dir, "latency", {"device": device.key, **to_dict(cfg)}, metrics,
                          {"teacher": str(teacher_dir.resolve())}, config_hash=fingerprint)
