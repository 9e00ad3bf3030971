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

Decoder subnets (`canao latency-lm`, family "decoder") go the same way, with the latency a
user of generation feels: ms per generated token of the compiled decode step over a KV
cache of `seq_len` positions (the context length; the compiled step attends over its whole
cache), timed with the generation benchmark after a prompt that fills the rest of the cache,
and the work of one decode step per op class (canao.space.decoder_work) as the features.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls
from scipy.stats import spearmanr
from transformers import BertConfig

from canao import device_lab
from canao.config import (
    BenchConfig,
    CompileConfig,
    DecoderShape,
    GenBenchConfig,
    LatencyConfig,
    LMCompileConfig,
    LMLatencyConfig,
    config_hash,
    to_dict,
)
from canao.hardware import check_same
from canao.manifest import read_manifest, reusable, write_manifest
from canao.models.bert_qa import load_tokenizer
from canao.models.modeling_canao_bert import CanaoBertForQuestionAnswering
from canao.models.supernet import subnet_config
from canao.space import (
    DecoderSpace,
    DecoderSubnet,
    SearchSpace,
    SubnetConfig,
    TeacherShape,
    decoder_flops,
    decoder_shape,
    decoder_work,
    flops,
)

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


def decode_features(subnet: DecoderSubnet, teacher: DecoderShape, context: int) -> np.ndarray:
    """Work of each op class (FEATURES) of one decode step over a KV cache of `context` positions."""
    work = decoder_work(subnet, teacher, context)
    return np.array([1.0, work["dense"], work["attention"], work["elementwise"]], dtype=float)


@dataclasses.dataclass(frozen=True)
class Family:
    """What the latency model needs to know of a family of subnets."""

    subnet: type  # the subnet config type (from_dict, to_dict, label)
    shape: type  # the teacher's shape type
    features: Callable  # (subnet, teacher, seq_len) -> work of each FEATURES op class
    flops: Callable  # (subnet, teacher, seq_len) -> FLOPs: the compiler-unaware proxy


FAMILIES = {"bert-qa": Family(SubnetConfig, TeacherShape, features, flops),
            "decoder": Family(DecoderSubnet, DecoderShape, decode_features, decoder_flops)}


@dataclasses.dataclass
class LatencyModel:
    device: str  # device key the measurements were taken on
    seq_len: int  # sequence length of every measurement (decoder: the KV cache's length, the context)
    teacher: TeacherShape | DecoderShape
    coefficients: dict[str, list[float]]  # backend -> ms per unit of each FEATURES entry
    measurements: list[dict]  # {"subnet": {...}, "ms": {backend: p50 ms (decoder: ms/token)}, "heldout": bool}
    error: dict  # backend -> held-out MAPE and Spearman of this model and of the FLOPs proxy
    family: str = "bert-qa"  # FAMILIES key: which subnets, features and FLOPs proxy
    hardware: dict | None = None  # canao.hardware.Hardware of the device when measured; None in older models

    def predict(self, subnet, backend: str) -> float:
        if backend not in self.coefficients:
            raise ValueError(f"backend {backend!r}: no latency model (have {', '.join(self.coefficients)})")
        x = FAMILIES[self.family].features(subnet, self.teacher, self.seq_len)
        return float(x @ np.asarray(self.coefficients[backend]))

    def measured(self, subnet) -> dict[str, float]:
        """The ms by backend measured for `subnet` (one of the timed samples, e.g. the teacher's shape)."""
        return next(m["ms"] for m in self.measurements if m["subnet"] == subnet.to_dict())

    def fastest(self, subnet) -> tuple[float, str]:
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
        family = data.get("family", "bert-qa")
        if family not in FAMILIES:
            raise ValueError(f"{path}: family: unknown {family!r} (known: {', '.join(FAMILIES)})")
        data["teacher"] = FAMILIES[family].shape(**data["teacher"])
        return cls(**data)

    @classmethod
    def fit(cls, device: str, seq_len: int, teacher, measurements: list[dict], family: str = "bert-qa",
            hardware: dict | None = None) -> LatencyModel:
        """Fit every backend on the measurements not held out; score on those held out."""
        kind = FAMILIES[family]
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


def sample_subnets(space: SearchSpace | DecoderSpace, samples: int, seed: int) -> list:
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


def _measure_and_fit(out_dir: Path, fingerprint: str, device: device_lab.Device, seq_len: int, teacher, family: str,
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
                          config_hash=fingerprint, family=family, hardware=hardware.to_dict())


def fit_latency_model(cfg: LatencyConfig, device_key: str, out_dir: str | Path, teacher_dir: str | Path) -> dict:
    """Measure `cfg.samples` subnets of the QA teacher on `device_key` (the device lab must be up),
    fit the latency model of every backend, and write it with its measurements to `out_dir`
    (resumable: see `_measure_and_fit`)."""
    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    device = device_lab.get_device(device_key)
    teacher = TeacherShape.of(BertConfig.from_pretrained(teacher_dir))
    fingerprint = config_hash(cfg) + f"-{device.key}-" + config_hash(teacher)
    subnets = sample_subnets(SearchSpace(cfg.space, teacher), cfg.samples, cfg.seed)

    def measure_one(subnet: SubnetConfig, work_dir: Path) -> dict[str, float]:
        return measure(subnet, teacher_dir, device.key, cfg.backends, cfg.compile, cfg.bench, work_dir)

    return _measure_and_fit(out_dir, fingerprint, device, cfg.compile.seq_len, teacher, "bert-qa", subnets,
                            cfg.holdout, measure_one, to_dict(cfg), {"teacher": str(teacher_dir.resolve())},
                            cfg.compile.reuse_other_hardware)


def measure_decoder(subnet: DecoderSubnet, teacher_dir: Path, device_key: str, backends: tuple[str, ...],
                    compile_cfg: LMCompileConfig, new_tokens: int, repeats: int, work_dir: Path) -> dict[str, float]:
    """ms per generated token of `subnet` on the (local) device for each backend: a random-weight
    decoder of its shape, compiled by compile-lm (shared tuning database) for "tvm", exported to
    GGUF at the teacher file's precision for "llama.cpp", timed by the
    generation benchmark after a prompt that fills the cache but `new_tokens`. `work_dir` is
    scratch space, removed afterwards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from canao import bench
    from canao.compile import compile_lm
    from canao.models import elastic_decoder, llama_lm
    from canao.models.gguf_export import GGUF_FILE, export_gguf

    shutil.rmtree(work_dir, ignore_errors=True)
    model_dir, artifact = work_dir / "model", None
    try:
        torch.manual_seed(0)
        config = elastic_decoder.subnet_config(LlamaConfig.from_pretrained(teacher_dir), subnet)
        LlamaForCausalLM(config).save_pretrained(model_dir)
        llama_lm.load_tokenizer(teacher_dir).save_pretrained(model_dir)
        if "tvm" in backends:
            artifact = work_dir / "compiled"
            compile_lm(model_dir, device_key, compile_cfg, artifact)
        if "llama.cpp" in backends:
            export_gguf(model_dir, model_dir / GGUF_FILE)
        timing = GenBenchConfig(contexts=(compile_cfg.max_context - new_tokens,), new_tokens=new_tokens,
                                repeats=repeats, devices=(device_key,))
        records = bench.bench_generation(model_dir, artifact, device_key, backends, timing, compile_cfg,
                                         litert_root=work_dir / "litert")
        return {r.backend: round(r.ms_per_token, 4) for r in records}
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def fit_decoder_latency_model(cfg: LMLatencyConfig, device_key: str, out_dir: str | Path,
                              teacher_dir: str | Path) -> dict:
    """`canao latency-lm`: measure `cfg.samples` decoder subnets of the teacher generating on the
    local device `device_key`, fit the per-token latency model of every backend at the context
    `cfg.compile.max_context`, and write it with its measurements to `out_dir` (resumable)."""
    from transformers import LlamaConfig

    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    device = device_lab.get_device(device_key)
    if not device.local:
        raise ValueError(f"device {device.key}: generation is timed on this machine; pick a local device")
    teacher = decoder_shape(LlamaConfig.from_pretrained(teacher_dir))
    fingerprint = config_hash(cfg) + f"-{device.key}-" + config_hash(teacher)
    subnets = sample_subnets(DecoderSpace(cfg.space, teacher), cfg.samples, cfg.seed)

    def measure_one(subnet: DecoderSubnet, work_dir: Path) -> dict[str, float]:
        return measure_decoder(subnet, teacher_dir, device.key, cfg.backends, cfg.compile, cfg.new_tokens,
                               cfg.repeats, work_dir)

    return _measure_and_fit(out_dir, fingerprint, device, cfg.compile.max_context, teacher, "decoder", subnets,
                            cfg.holdout, measure_one, to_dict(cfg), {"teacher": str(teacher_dir.resolve())},
                            cfg.compile.reuse_other_hardware)
