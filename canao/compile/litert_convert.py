"""LiteRT conversion, shared by the families' converter scripts: `canao.qa.litert` (a BERT-QA
model, optionally dynamic-range int8) and `canao.lm.litert` (one KV-cache step of a decoder).

Those scripts run with the LiteRT converter's own python (`make litert-env`, .venv-litert),
never with canao's: litert-torch cannot share an environment with TVM (TOOLCHAIN.md), so this
file imports only torch, litert_torch and ai_edge_quantizer. canao runs a script as a module
through `canao.compile.peers.convert_litert`, with the project on its path.
"""

import argparse
from pathlib import Path

import litert_torch
import torch
from ai_edge_quantizer import quantizer, recipe


def convert(module: torch.nn.Module, sample_kwargs: dict[str, torch.Tensor], out: Path, int8: bool = False) -> None:
    """`module` traced at `sample_kwargs`, as LiteRT in `out`; with `int8`, dynamic-range int8
    weights (activations quantized on the fly: no calibration data needed). The converter names
    the signature after the sample kwargs and the keys of the dict `module` returns, so
    canao.compile.peers.LiteRTRunner finds tensors by those names instead of args_0, output_0."""
    edge_model = litert_torch.convert(module.eval(), sample_kwargs=sample_kwargs)
    if not int8:
        edge_model.export(str(out))
        return
    quantized = quantizer.Quantizer(edge_model.model_content(), recipe.dynamic_wi8_afp32()).quantize()
    quantized.export_model(str(out), overwrite=True)


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every converter script takes; it adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, required=True, help="model directory (config.json, weights)")
    parser.add_argument("--seq-len", type=int, required=True, help="static sequence length of the inputs")
    parser.add_argument("--out", type=Path, required=True, help="the .tflite file to write")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The checked arguments; the output's directory made."""
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: not a model directory (no config.json)")
    if args.seq_len < 1:
        parser.error(f"--seq-len {args.seq_len}: must be positive")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return args
