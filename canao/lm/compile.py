"""compile-lm: a Llama-architecture decoder -> one artifact directory holding two TVM libraries
for the device (canao.compile.relax), a prefill step and a decode step over a static KV cache,
each checked against PyTorch; with the tokenizer, the configs and a manifest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from canao.compile.relax import artifact_config, build_checked, new_out_dir
from canao.lab.devices import Device
from canao.lm import model as lm_model
from canao.lm.config import LMCompileConfig
from canao.manifest import staged_dir, write_manifest

# The decoder's two compiled steps, by phase, and where each lives inside an artifact directory.
LM_LIBRARIES = {"prefill": "tvm/prefill.so", "decode": "tvm/decode.so"}


def compile_lm(model_dir: str | Path, device: Device, cfg: LMCompileConfig, out_dir: str | Path) -> dict:
    """Compile a Llama-architecture causal LM of `model_dir` for `device` into `out_dir`: a
    prefill step (`cfg.prefill_len` tokens) and a decode step (one token) over a static KV cache
    of `cfg.max_context` positions (canao.lm.model.KVCacheStep), each checked against
    PyTorch on a cache of random contents; plus tokenizer, config and manifest."""
    out_dir, model_dir = new_out_dir(out_dir), Path(model_dir)
    model = lm_model.load_causal_lm(model_dir)
    tokenizer = lm_model.load_tokenizer(model_dir)
    step = lm_model.KVCacheStep(model, cfg.max_context).eval()
    chunks = {"prefill": cfg.prefill_len, "decode": 1}
    with staged_dir(out_dir) as staging:
        numerics, tuning = {}, {}
        for phase, library in LM_LIBRARIES.items():
            # A chunk part-way into the cache, so the check covers the cache write and the causal mask.
            inputs = lm_model.step_inputs(step, chunks[phase], start=(cfg.max_context - chunks[phase]) // 2)
            with torch.no_grad():
                reference = [t.numpy() for t in step(*inputs)]
            numerics[phase], tuning[phase] = build_checked(step, inputs, reference, device, cfg, staging / library,
                                                           f"{model_dir} ({phase})")
        tokenizer.save_pretrained(staging)
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        manifest = write_manifest(
            staging, "compile-lm", config=artifact_config(device, cfg),
            metrics={"numerics_max_abs_diff": numerics, "tuning": tuning},
            inputs={"model": str(model_dir.resolve())},
            backends=dict(LM_LIBRARIES), hardware=device.hardware().to_dict(),
            eos_token_ids=list(lm_model.eos_token_ids(model, tokenizer)),
        )
    return manifest
