"""latency-lm: the latency models of decoder subnets (canao.codesign.latency_model's family
"decoder"), for the two latencies a user of generation feels, both timed with the generation
benchmark on one prompt that fills the KV cache but the tokens to generate: ms per generated
token of the compiled decode step over a cache of `seq_len` positions (the context length;
the compiled step attends over its whole cache), fitted on the work of one decode step per op
class (canao.lm.space.decoder_work); and the time to first token (the prompt processed, the
first token sampled), fitted on the work of that prompt's prefill (canao.lm.space.prefill_work).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from canao.codesign.latency_model import Family, Metric, measure_and_fit, sample_subnets
from canao.config import config_hash, to_dict
from canao.lab.devices import Device
from canao.lm import model as lm_model
from canao.lm.bench import bench_generation
from canao.lm.compile import compile_lm
from canao.lm.config import DecoderShape, GenBenchConfig, LMCompileConfig, LMLatencyConfig
from canao.lm.gguf import GGUF_FILE, export_gguf
from canao.lm.model import subnet_config
from canao.lm.space import DecoderSpace, DecoderSubnet, decoder_shape, decoder_work, prefill_work

# The latencies each subnet is timed for: every measurement's field ({backend: ms}) of each.
PER_TOKEN = "ms"  # ms per generated token (the name it had as the only one)
FIRST_TOKEN = "time_to_first_token_ms"  # the prompt processed and the first token sampled


def work_metric(key: str, work: Callable[[DecoderSubnet, DecoderShape, int], dict[str, int]]) -> Metric:
    """The metric `key`, fitted on the work of each op class (FEATURES) that `work(subnet,
    teacher, tokens)` counts, beside the matmul FLOPs of that work: the proxy that a
    compiler-unaware search would use."""

    def features(subnet: DecoderSubnet, teacher: DecoderShape, tokens: int) -> np.ndarray:
        counted = work(subnet, teacher, tokens)
        return np.array([1.0, counted["dense"], counted["attention"], counted["elementwise"]], dtype=float)

    def flops(subnet: DecoderSubnet, teacher: DecoderShape, tokens: int) -> int:
        counted = work(subnet, teacher, tokens)
        return counted["dense"] + counted["attention"]

    return Metric(key, features, flops)


# ms per token at the context (the KV cache's length); time to first token at the prompt's length
DECODER = Family("decoder", DecoderSubnet, DecoderShape,
                 (work_metric(PER_TOKEN, decoder_work), work_metric(FIRST_TOKEN, prefill_work)))


def prompt_tokens(compile_cfg: LMCompileConfig, new_tokens: int) -> int:
    """The timed prompt's length: it fills the KV cache but the `new_tokens` generated after it."""
    return compile_cfg.max_context - new_tokens


def measure_decoder(subnet: DecoderSubnet, teacher_dir: Path, device: Device, backends: tuple[str, ...],
                    compile_cfg: LMCompileConfig, new_tokens: int, repeats: int,
                    work_dir: Path) -> dict[str, dict[str, float]]:
    """ms per generated token (PER_TOKEN) and time to first token (FIRST_TOKEN) of `subnet` on the
    (local) device, each by backend: a random-weight decoder of its shape, compiled by
    compile-lm (shared tuning database) for "tvm", exported to GGUF at the teacher file's
    precision for "llama.cpp", timed by the generation benchmark after a prompt of
    `prompt_tokens`. `work_dir` is scratch space, removed afterwards."""
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
        timing = GenBenchConfig(contexts=(prompt_tokens(compile_cfg, new_tokens),), new_tokens=new_tokens,
                                repeats=repeats, devices=(device.key,))
        records = bench_generation(model_dir, artifact, device, backends, timing, compile_cfg,
                                   litert_root=work_dir / "litert")
        return {PER_TOKEN: {r.backend: round(r.ms_per_token, 4) for r in records},
                FIRST_TOKEN: {r.backend: round(r.time_to_first_token_ms, 4) for r in records}}
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def fit_decoder_latency_model(cfg: LMLatencyConfig, device: Device, out_dir: str | Path,
                              teacher_dir: str | Path) -> dict:
    """`canao latency-lm`: measure `cfg.samples` decoder subnets of the teacher generating on the
    local `device`, fit the latency models of every backend, per token at the context
    `cfg.compile.max_context` and to the first token at the prompt's length, and write them with
    their measurements to `out_dir` (resumable)."""
    from transformers import LlamaConfig

    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    if not device.local:
        raise ValueError(f"device {device.key}: generation is timed on this machine; pick a local device")
    teacher = decoder_shape(LlamaConfig.from_pretrained(teacher_dir))
    fingerprint = config_hash(cfg) + f"-{device.key}-" + config_hash(teacher)
    subnets = sample_subnets(DecoderSpace(cfg.space, teacher), cfg.samples, cfg.seed)

    def measure_one(subnet: DecoderSubnet, work_dir: Path) -> dict[str, dict[str, float]]:
        return measure_decoder(subnet, teacher_dir, device, cfg.backends, cfg.compile, cfg.new_tokens,
                               cfg.repeats, work_dir)

    seq_lens = {PER_TOKEN: cfg.compile.max_context, FIRST_TOKEN: prompt_tokens(cfg.compile, cfg.new_tokens)}
    return measure_and_fit(out_dir, fingerprint, device, seq_lens, teacher, DECODER, subnets, cfg.holdout,
                           measure_one, to_dict(cfg), {"teacher": str(teacher_dir.resolve())},
                           cfg.compile.reuse_other_hardware)
