"""latency: the per-device latency model of BERT-QA subnets (canao.codesign.latency_model's
family "bert-qa"): sampled subnets built with random weights (latency depends on the shape
only), compiled by the compiler stage (TVM, tuned through the device's shared tuning
database, plus the peer exports) and timed on the device through the lab with the
benchmark protocol. The work of one forward pass per op class (`features`) is what the
model is fitted on.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig

from canao.codesign.latency_model import Family, Metric, measure_and_fit, sample_subnets
from canao.config import config_hash, to_dict
from canao.lab.devices import Device
from canao.qa.bench import BASELINE, in_frame_of, median_ms, timed_in_turn
from canao.qa.compile import compile_model
from canao.qa.config import BenchConfig, BertShape, CompileConfig, LatencyConfig
from canao.qa.model import load_tokenizer, subnet_config
from canao.qa.modeling_canao_bert import CanaoBertForQuestionAnswering
from canao.qa.space import SearchSpace, SubnetConfig, flops


def features(subnet: SubnetConfig, teacher: BertShape, seq_len: int) -> np.ndarray:
    """Work of each op class (FEATURES) of one forward pass at `seq_len` tokens."""
    h, d, s = subnet.hidden_size, teacher.head_size, seq_len
    dense = attention = elementwise = 0.0
    for a, f in zip(subnet.heads, subnet.ffn_sizes, strict=True):
        w = a * d
        dense += 2 * s * h * (4 * w + 2 * f)
        attention += 4 * s * s * w
        elementwise += a * s * s + s * f + 4 * s * h  # softmax, GELU, two LayerNorms and residual adds
    return np.array([1.0, dense, attention, elementwise])


BERT_QA = Family("bert-qa", SubnetConfig, BertShape, (Metric("ms", features, flops),))  # p50 ms


@dataclass(frozen=True)
class Frame:
    """A compiled model timed on BASELINE in turn with each measured subnet (`measure`), whose
    figures are then given as they would read where it reads `ms`."""

    artifact_dir: Path
    model_dir: Path
    ms: float


FRAME = "frame"  # the frame model's name among the timed ones


def shape_model(subnet: SubnetConfig, teacher_dir: Path, model_dir: Path) -> Path:
    """A model of `subnet`'s shape with random weights (latency depends on the shape only) and
    the teacher's tokenizer, saved to `model_dir`."""
    torch.manual_seed(0)
    CanaoBertForQuestionAnswering(subnet_config(BertConfig.from_pretrained(teacher_dir), subnet)).save_pretrained(
        model_dir)
    load_tokenizer(teacher_dir).save_pretrained(model_dir)
    return model_dir


def measure(subnet: SubnetConfig, teacher_dir: Path, device: Device, backends: tuple[str, ...],
            compile_cfg: CompileConfig, bench_cfg: BenchConfig, work_dir: Path, rounds: int = 1,
            frame: Frame | None = None) -> dict[str, float]:
    """p50 latency (ms) of `subnet` on the device for each backend: a `shape_model`, compiled by the
    compiler stage (shared tuning database), timed with the benchmark protocol, the median over
    `rounds` processes (`timed_in_turn`); with a `frame`, timed in turn with it and given in its
    frame (`in_frame_of`). `work_dir` is scratch space, removed afterwards."""
    shutil.rmtree(work_dir, ignore_errors=True)
    try:
        model_dir = shape_model(subnet, teacher_dir, work_dir / "model")
        cfg = dataclasses.replace(compile_cfg, peers=tuple(b for b in backends if b != "tvm"))
        compile_model(model_dir, device, cfg, work_dir / "compiled")
        targets = {"model": (work_dir / "compiled", model_dir)}
        if frame is not None:
            targets[FRAME] = (frame.artifact_dir, frame.model_dir)
        timings = timed_in_turn(targets, device, backends, bench_cfg, rounds, {FRAME: (BASELINE,)})
        ms = in_frame_of(timings[FRAME], BASELINE, frame.ms, timings["model"]) if frame else median_ms(
            timings["model"])
        return {backend: round(value, 4) for backend, value in ms.items()}
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def fit_latency_model(cfg: LatencyConfig, device: Device, out_dir: str | Path, teacher_dir: str | Path) -> dict:
    """Measure `cfg.samples` subnets of the QA teacher on `device` (the device lab must be up),
    fit the latency model of every backend, and write it with its measurements to `out_dir`
    (resumable: see `measure_and_fit`)."""
    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    teacher = BertShape.of(BertConfig.from_pretrained(teacher_dir))
    fingerprint = config_hash(cfg) + f"-{device.key}-" + config_hash(teacher)
    subnets = sample_subnets(SearchSpace(cfg.space, teacher), cfg.samples, cfg.seed)

    def measure_one(subnet: SubnetConfig, work_dir: Path) -> dict[str, dict[str, float]]:
        return {"ms": measure(subnet, teacher_dir, device, cfg.backends, cfg.compile, cfg.bench, work_dir)}

    return measure_and_fit(out_dir, fingerprint, device, {"ms": cfg.compile.seq_len}, teacher, BERT_QA, subnets,
                            cfg.holdout, measure_one, to_dict(cfg), {"teacher": str(teacher_dir.resolve())},
                            cfg.compile.reuse_other_hardware)
