"""Convert a BERT-QA model directory to a LiteRT (.tflite) model, optionally dynamic-range int8;
or one step of a Llama decoder over a static KV cache (canao.lm.model.KVCacheStep).

Runs with the LiteRT converter's own python (`make litert-env`, .venv-litert), never with
canao's: litert-torch cannot share an environment with TVM (TOOLCHAIN.md), so this file
imports only torch, transformers, litert_torch, ai_edge_quantizer and, for a decoder,
canao.lm.model (which needs nothing more; canao.compile.peers puts the project on the path).
canao calls it by file path through `canao.compile.peers.export_litert` and `export_litert_step`.

    .venv-litert/bin/python canao/compile/litert_convert.py --model DIR --seq-len 128 --out model.tflite [--int8]
    .venv-litert/bin/python canao/compile/litert_convert.py --model DIR --decoder --max-context 640 --seq-len 1 \
        --out decode.tflite
"""

import argparse
from pathlib import Path

import litert_torch
import torch
from ai_edge_quantizer import quantizer, recipe
from transformers import AutoModelForQuestionAnswering, BertForQuestionAnswering

# These mirror canao.qa.model (SpanLogits, INPUT_NAMES, OUTPUT_NAMES), which cannot be
# imported here. The converter names the model's signature after the sample kwargs and the
# returned dict's keys, so LiteRTRunner finds tensors by these names instead of args_0, output_0.
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
OUTPUT_NAMES = ("start_logits", "end_logits")


class NamedSpanLogits(torch.nn.Module):
    def __init__(self, model: BertForQuestionAnswering):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):
        out = self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return dict(zip(OUTPUT_NAMES, (out.start_logits, out.end_logits), strict=True))


def convert(model_dir: Path, seq_len: int, out: Path, int8: bool) -> None:
    # Eager attention: the exporters trace it best (as canao.qa.model.load_for_export).
    # trust_remote_code: a searched student carries its own modeling file (per-layer widths).
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir, trust_remote_code=True,
                                                          attn_implementation="eager").eval()
    # int32 token ids: the converter narrows int64 inputs to int32 anyway (the same graph either
    # way), and tracing with int32 avoids its downcast warning.
    sample_kwargs = {name: torch.zeros(1, seq_len, dtype=torch.int32) for name in INPUT_NAMES}
    sample_kwargs["attention_mask"] += 1
    edge_model = litert_torch.convert(NamedSpanLogits(model).eval(), sample_kwargs=sample_kwargs)
    if not int8:
        edge_model.export(str(out))
        return
    # Dynamic range: int8 weights, activations quantized on the fly; no calibration data needed.
    quantized = quantizer.Quantizer(edge_model.model_content(), recipe.dynamic_wi8_afp32()).quantize()
    quantized.export_model(str(out), overwrite=True)


class NamedStep(torch.nn.Module):
    """A KV-cache step returning its outputs by name (the converter names the signature after them)."""

    def __init__(self, step: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.step, self.names = step, names

    def forward(self, tokens, start, last, keys, values):
        return dict(zip(self.names, self.step(tokens, start, last, keys, values), strict=True))


def convert_step(model_dir: Path, max_context: int, tokens: int, out: Path) -> None:
    """KVCacheStep of `tokens` tokens (1: the decode step; more: a prefill chunk) over a cache of
    `max_context` positions, float32 weights and cache; int32 tokens and positions."""
    # Here, not at the top: a BERT conversion needs only the converter's own packages.
    from canao.lm.model import STEP_INPUTS, STEP_OUTPUTS, KVCacheStep, load_causal_lm

    step = KVCacheStep(load_causal_lm(model_dir), max_context).eval()
    keys, values = step.empty_cache()
    position = torch.zeros(1, dtype=torch.int32)
    sample = (torch.zeros(1, tokens, dtype=torch.int32), position, position, keys, values)
    litert_torch.convert(NamedStep(step, STEP_OUTPUTS).eval(),
                         sample_kwargs=dict(zip(STEP_INPUTS, sample, strict=True))).export(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory (config.json, weights)")
    parser.add_argument("--seq-len", type=int, required=True, help="static sequence length of the inputs")
    parser.add_argument("--out", type=Path, required=True, help="the .tflite file to write")
    parser.add_argument("--int8", action="store_true", help="dynamic-range int8 weights (recipe dynamic_wi8_afp32)")
    parser.add_argument("--decoder", action="store_true", help="a Llama decoder's KV-cache step of --seq-len tokens")
    parser.add_argument("--max-context", type=int, default=0, help="with --decoder: the cache's positions")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: not a model directory (no config.json)")
    if args.seq_len < 1:
        parser.error(f"--seq-len {args.seq_len}: must be positive")
    if args.decoder and not args.seq_len <= args.max_context:
        parser.error(f"--max-context {args.max_context}: must hold the step's --seq-len {args.seq_len} tokens")
    if args.decoder and args.int8:
        parser.error("--int8: for BERT-QA models only")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.decoder:
        convert_step(args.model, args.max_context, args.seq_len, args.out)
    else:
        convert(args.model, args.seq_len, args.out, args.int8)


if __name__ == "__main__":
    main()
