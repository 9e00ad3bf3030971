"""Convert a BERT-QA model directory to a LiteRT (.tflite) model, optionally dynamic-range int8.

Runs with the LiteRT converter's python (canao.compile.litert_convert says why), so it imports
only torch, transformers, that module and the student's classes (canao.qa.modeling_canao_bert,
torch and transformers alone). canao runs it through `canao.qa.compile.export_litert`:

    .venv-litert/bin/python -m canao.qa.litert --model DIR --seq-len 128 --out model.tflite [--int8]
"""

import torch
from transformers import AutoModelForQuestionAnswering, BertForQuestionAnswering

from canao.compile.litert_convert import arguments, convert, parse
from canao.qa.modeling_canao_bert import register_local

# These mirror canao.qa.model (SpanLogits, INPUT_NAMES, OUTPUT_NAMES), which needs packages the
# converter's environment lacks.
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
OUTPUT_NAMES = ("start_logits", "end_logits")


class NamedSpanLogits(torch.nn.Module):
    def __init__(self, model: BertForQuestionAnswering):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):
        out = self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return dict(zip(OUTPUT_NAMES, (out.start_logits, out.end_logits), strict=True))


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--int8", action="store_true", help="dynamic-range int8 weights (recipe dynamic_wi8_afp32)")
    args = parse(parser)
    # Eager attention: the exporters trace it best (as canao.qa.model.load_for_export). A student
    # loads with canao's own classes, never with the modeling file saved beside its weights.
    register_local()
    model = AutoModelForQuestionAnswering.from_pretrained(args.model, trust_remote_code=False,
                                                          attn_implementation="eager").eval()
    # int32 token ids: the converter narrows int64 inputs to int32 anyway (the same graph either
    # way), and tracing with int32 avoids its downcast warning.
    sample_kwargs = {name: torch.zeros(1, args.seq_len, dtype=torch.int32) for name in INPUT_NAMES}
    sample_kwargs["attention_mask"] += 1
    convert(NamedSpanLogits(model), sample_kwargs, args.out, args.int8)


if __name__ == "__main__":
    main()
