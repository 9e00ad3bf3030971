"""Convert one step of a Llama decoder over a static KV cache (canao.lm.model.KVCacheStep) to a
LiteRT (.tflite) model: float32 weights and cache, int32 tokens and positions.

Runs with the LiteRT converter's python (canao.compile.litert_convert says why); canao.lm.model
needs nothing more. canao runs it through `canao.lm.generator.export_litert_step`:

    .venv-litert/bin/python -m canao.lm.litert --model DIR --max-context 640 --seq-len 1 --out decode.tflite
"""

import torch

from canao.compile.litert_convert import arguments, convert, parse
from canao.lm.model import STEP_INPUTS, STEP_OUTPUTS, KVCacheStep, load_causal_lm


class NamedStep(torch.nn.Module):
    """A KV-cache step returning its outputs by name (the converter names the signature after them)."""

    def __init__(self, step: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.step, self.names = step, names

    def forward(self, tokens, start, last, keys, values):
        return dict(zip(self.names, self.step(tokens, start, last, keys, values), strict=True))


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--max-context", type=int, required=True, help="the cache's positions")
    args = parse(parser)
    if not args.seq_len <= args.max_context:
        parser.error(f"--max-context {args.max_context}: must hold the step's --seq-len {args.seq_len} tokens")
    step = KVCacheStep(load_causal_lm(args.model), args.max_context).eval()
    keys, values = step.empty_cache()
    position = torch.zeros(1, dtype=torch.int32)
    sample = (torch.zeros(1, args.seq_len, dtype=torch.int32), position, position, keys, values)
    convert(NamedStep(step, STEP_OUTPUTS), dict(zip(STEP_INPUTS, sample, strict=True)), args.out)


if __name__ == "__main__":
    main()
