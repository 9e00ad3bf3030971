"""compile: a QA model directory -> one artifact directory holding the TVM library for the
device (canao.compile.relax) and the same model exported for each peer runtime (ONNX Runtime,
LiteRT; canao.compile.peers), so the benchmark compares like with like; with the tokenizer,
the config and a manifest. Nothing is written unless every numerics check passes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from canao.compile import peers
from canao.compile.relax import artifact_config, build_checked, max_abs_diff, new_out_dir
from canao.lab.devices import Device
from canao.manifest import staged_dir, write_manifest
from canao.qa.config import CompileConfig
from canao.qa.model import INPUT_NAMES, OUTPUT_NAMES, SpanLogits, example_inputs, load_for_export, load_tokenizer
from canao.qa.predictor import backend_runner

TVM_LIBRARY = "tvm/model.so"
# The peers by name, as stage configs list them, and where each lives inside an artifact directory.
PEER_FILES = {
    "onnxruntime": "onnx/model.onnx",
    "onnxruntime-int8": "onnx/model-int8.onnx",
    "litert": "litert/model.tflite",
    "litert-int8": "litert/model-int8.tflite",
}


def export_litert(model_dir: str | os.PathLike, seq_len: int, path: str | os.PathLike, int8: bool = False) -> Path:
    """The model of `model_dir` as LiteRT with static [1, seq_len] int32 inputs (dynamic-range
    int8 weights if `int8`), converted by canao.qa.litert in the converter's own environment."""
    return peers.convert_litert("canao.qa.litert", model_dir, path,
                                ["--seq-len", str(seq_len)] + (["--int8"] if int8 else []))


def export(name: str, model_dir: str | os.PathLike, model: SpanLogits, seq_len: int, out_dir: str | os.PathLike,
           int8_dot: bool) -> Path:
    """Peer `name`'s file for the model of `model_dir` (`model`: the same, from load_for_export),
    written to out_dir/PEER_FILES[name], for a CPU with or without int8 dot products (`int8_dot`:
    canao.hardware.Hardware.int8_dot). onnxruntime-int8 quantizes the fp32 ONNX file, exporting
    it first if it is not there yet (it then stays beside the int8 one)."""
    if name not in PEER_FILES:
        raise ValueError(f"peer {name!r}: unknown; one of {list(PEER_FILES)}")
    path = Path(out_dir) / PEER_FILES[name]
    fp32_onnx = Path(out_dir) / PEER_FILES["onnxruntime"]
    if name.startswith("onnxruntime") and not fp32_onnx.is_file():
        peers.export_onnx(model, example_inputs(seq_len), INPUT_NAMES, OUTPUT_NAMES, fp32_onnx)
    if name == "onnxruntime":
        return path
    if name == "onnxruntime-int8":
        return peers.quantize_onnx_int8(fp32_onnx, path, int8_dot)
    return export_litert(model_dir, seq_len, path, int8=name == "litert-int8")


def compile_model(model_dir: str | Path, device: Device, cfg: CompileConfig, out_dir: str | Path) -> dict:
    """Compile `model_dir` for `device` into `out_dir` (TVM library, peer exports,
    tokenizer, config, manifest). Nothing is written unless every numerics check passes."""
    hardware = device.hardware()
    out_dir, model_dir = new_out_dir(out_dir), Path(model_dir)
    model = load_for_export(model_dir)
    inputs = example_inputs(cfg.seq_len)
    with torch.no_grad():
        reference = [t.numpy() for t in model(*inputs)]

    with staged_dir(out_dir) as staging:
        numerics = {}
        numerics["tvm"], tuning = build_checked(model, inputs, reference, device, cfg, staging / TVM_LIBRARY,
                                                str(model_dir))
        backends = {"tvm": TVM_LIBRARY}
        numpy_inputs = [t.numpy() for t in inputs]
        for name in cfg.peers:
            path = export(name, model_dir, model, cfg.seq_len, staging, hardware.int8_dot)
            backends[name] = path.relative_to(staging).as_posix()
            numerics[name] = max_abs_diff(backend_runner(name, path, threads=1)(*numpy_inputs), reference)
        load_tokenizer(model_dir).save_pretrained(staging)
        shutil.copy(model_dir / "config.json", staging / "config.json")
        manifest = write_manifest(
            staging, "compile", config=artifact_config(device, cfg),
            metrics={"numerics_max_abs_diff": numerics, "tuning": tuning},
            inputs={"model": str(model_dir.resolve())},
            backends=backends, hardware=hardware.to_dict(),
        )
    return manifest
