"""latency-lm: the per-token latency model of decoder subnets (canao.codesign.latency_model's
family "decoder"), with the latency a user of generation feels: ms per generated token of
the compiled decode step over a KV cache of `seq_len` positions (the context length; the
compiled step attends over its whole cache), timed with the generation benchmark after a
prompt that fills the rest of the cache, and the work of one decode step per op class
(canao.lm.space.decoder_work) as the features.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from canao.codesign.latency_model import Family, measure_and_fit, sample_subnets
from canao.config import config_hash, to_dict
from canao.lab.devices import Device
from canao.lm import model as lm_model
from canao.lm.bench import bench_generation
from canao.lm.compile import compile_lm
from canao.lm.config import DecoderShape, GenBenchConfig, LMCompileConfig, LMLatencyConfig
from canao.lm.gguf import GGUF_FILE, export_gguf
from canao.lm.model import subnet_config
from canao.lm.space import DecoderSpace, DecoderSubnet, decoder_flops, decoder_shape, decoder_work


def decode_features(subnet: DecoderSubnet, teacher: DecoderShape, context: int) -> np.ndarray:
    """Work of each op class (FEATURES) of one decode step over a KV cache of `context` positions."""
    work = decoder_work(subnet, teacher, context)
    return np.array([1.0, work["dense"], work["attention"], work["elementwise"]], dtype=float)


DECODER = Family("decoder", DecoderSubnet, DecoderShape, decode_features, decoder_flops)


def measure_decoder(subnet: DecoderSubnet, teacher_dir: Path, device: Device, backends: tuple[str, ...],
                    compile_cfg: LMCompileConfig, new_tokens: int, repeats: int, work_dir: Path) -> dict[str, float]:
    """ms per generated token of `subnet` on the (local) device for each backend: a random-weight
    decoder of its shape, compiled by compile-lm (shared tuning database) for "tvm", exported to
    GGUF at the teacher file's precision for "llama.cpp", timed by the
    generation benchmark after a prompt that fills the cache but `new_tokens`. `work_dir` is
    scratch space, removed afterwards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(work_dir, ignore_errors=True)
    model_dir, artifact = work_dir / "model", None
    try:
        torch.manual_seed(0)
        config = subnet_config(LlamaConfig.from_pretrained(teacher_dir), subnet)
        LlamaForCausalLM(config).save_pretrained(model_dir)
        lm_model.load_tokenizer(teacher_dir).save_pretrained(model_dir)
        if "tvm" in backends:
            artifact = work_dir / "compiled"
            compile_lm(model_dir, device, compile_cfg, artifact)
        if "llama.cpp" in backends:
            export_gguf(model_dir, model_dir / GGUF_FILE)
        timing = GenBenchConfig(contexts=(compile_cfg.max_context - new_tokens,), new_tokens=new_tokens,
                                repeats=repeats, devices=(device.key,))
        records = bench_generation(model_dir, artifact, device, backends, timing, compile_cfg,
                                   litert_root=work_dir / "litert")
        return {r.backend: round(r.ms_per_token, 4) for r in records}
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def fit_decoder_latency_model(cfg: LMLatencyConfig, device: Device, out_dir: str | Path,
                              teacher_dir: str | Path) -> dict:
    """`canao latency-lm`: measure `cfg.samples` decoder subnets of the teacher generating on the
    local `device`, fit the per-token latency model of every backend at the context
    `cfg.compile.max_context`, and write it with its measurements to `out_dir` (resumable)."""
    from transformers import LlamaConfig

    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    if not device.local:
        raise ValueError(f"device {device.key}: generation is timed on this machine; pick a local device")
    teacher = decoder_shape(LlamaConfig.from_pretrained(teacher_dir))
    fingerprint = config_hash(cfg) + f"-{device.key}-" + config_hash(teacher)
    subnets = sample_subnets(DecoderSpace(cfg.space, teacher), cfg.samples, cfg.seed)

    def measure_one(subnet: DecoderSubnet, work_dir: Path) -> dict[str, float]:
        return measure_decoder(subnet, teacher_dir, device, cfg.backends, cfg.compile, cfg.new_tokens,
                               cfg.repeats, work_dir)

    return measure_and_fit(out_dir, fingerprint, device, cfg.compile.max_context, teacher, DECODER, subnets,
                            cfg.holdout, measure_one, to_dict(cfg), {"teacher": str(teacher_dir.resolve())},
                            cfg.compile.reuse_other_hardware)
