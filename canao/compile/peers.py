"""The peer runtimes a compiled model is measured against: PyTorch eager, ONNX Runtime, LiteRT.

Exports write the same QA model for each runtime; runners run any of them (and the TVM
library, in this process) through one interface, so the benchmark, the numerics checks and
the server treat every backend alike.
"""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Protocol

import ai_edge_litert
import numpy as np
import onnxruntime as ort
import torch
from ai_edge_litert.interpreter import Interpreter
from onnxruntime.quantization import QuantType, quantize_dynamic

from canao.config import PROJECT_ROOT
from canao.qa.model import INPUT_NAMES, OUTPUT_NAMES, SpanLogits, example_inputs, load_qa_model

# LayerNormalization became a standard op in opset 17; ORT 1.32 runs it fused.
ONNX_OPSET = 17
LITERT_CONVERT_SCRIPT = Path(__file__).with_name("litert_convert.py")


def export_onnx(model: SpanLogits, seq_len: int, path: str | os.PathLike) -> Path:
    """`model` as ONNX with static [1, seq_len] inputs, through the legacy TorchScript exporter:
    with eager attention it runs faster in ORT than the dynamo export (TOOLCHAIN.md)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Choosing the legacy exporter is deliberate, tracing fixes the static shapes we want, and
        # the indexing it warns about takes non-negative positions only.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            model.eval(),
            example_inputs(seq_len),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return path


def quantize_onnx_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, int8_dot: bool) -> Path:
    """Dynamic int8 of an fp32 ONNX model for a CPU with (`int8_dot`) or without int8 dot-product
    instructions (VNNI, ARM dotprod). Per-channel weight scales: per-tensor ones dropped the
    output cosine to 0.90 on MiniLM, per-channel keeps it at 0.986+ (TOOLCHAIN.md). Without them
    ONNX Runtime multiplies u8 x s8 pairs into saturating 16-bit sums (AVX2's vpmaddubsw), so its
    weights keep 7 bits there (reduce_range), as ONNX Runtime advises for such CPUs."""
    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(Path(fp32_path), int8_path, per_channel=True, weight_type=QuantType.QInt8,
                     reduce_range=not int8_dot)
    return int8_path


def litert_python() -> Path:
    """The converter environment's python: CANAO_LITERT_PYTHON, else the project's .venv-litert."""
    return Path(os.environ.get("CANAO_LITERT_PYTHON", PROJECT_ROOT / ".venv-litert" / "bin" / "python"))


def export_litert(model_dir: str | os.PathLike, seq_len: int, path: str | os.PathLike, int8: bool = False) -> Path:
    """The model of `model_dir` as LiteRT with static [1, seq_len] int32 inputs (dynamic-range
    int8 weights if `int8`), converted in the converter's own environment: litert-torch cannot
    be installed beside TVM (TOOLCHAIN.md)."""
    return _convert_litert(model_dir, path, ["--seq-len", str(seq_len)] + (["--int8"] if int8 else []))


def export_litert_step(model_dir: str | os.PathLike, max_context: int, tokens: int, path: str | os.PathLike) -> Path:
    """One KV-cache step of the decoder of `model_dir` (canao.lm.model.KVCacheStep: `tokens`
    tokens over a cache of `max_context` positions) as LiteRT, float32, in the converter's environment."""
    return _convert_litert(model_dir, path, ["--decoder", "--max-context", str(max_context), "--seq-len", str(tokens)])


def _convert_litert(model_dir: str | os.PathLike, path: str | os.PathLike, options: list[str]) -> Path:
    python = litert_python()
    if not python.is_file():
        raise FileNotFoundError(
            f"{python}: no LiteRT converter environment; run `make litert-env` (or set CANAO_LITERT_PYTHON)"
        )
    path = Path(path)
    command = [str(python), str(LITERT_CONVERT_SCRIPT), "--model", str(model_dir), *options, "--out", str(path)]
    # The decoder step comes from canao.lm.model: the project on the converter's path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        stderr_tail = "\n".join(done.stderr.strip().splitlines()[-30:])
        raise RuntimeError(
            f"{LITERT_CONVERT_SCRIPT.name} failed (exit {done.returncode}) converting {model_dir} to {path}:\n"
            f"{stderr_tail}"
        )
    return path


class Runner(Protocol):
    """One backend running one exported model: numpy int64 [1, seq] inputs in,
    (start_logits, end_logits) float32 [1, seq] out. Calls are timed, so they do no setup."""

    name: str
    version: str

    def __call__(
        self, input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


class TorchRunner:
    """PyTorch eager with transformers' default sdpa attention: the reference the peers are checked against."""

    def __init__(self, model_dir: str | os.PathLike, threads: int, name: str = "torch"):
        self.name, self.version, self.threads = name, torch.__version__, threads
        self.model = SpanLogits(load_qa_model(model_dir)).eval()

    @torch.inference_mode()
    def __call__(self, input_ids, token_type_ids, attention_mask):
        # The thread count is process-wide: another runner of the same process may have changed it.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        start, end = self.model(*(torch.from_numpy(x) for x in (input_ids, token_type_ids, attention_mask)))
        return start.numpy(), end.numpy()


class OnnxRunner:
    def __init__(self, path: str | os.PathLike, threads: int, name: str = "onnxruntime"):
        self.name, self.version = name, ort.__version__
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids, token_type_ids, attention_mask):
        feeds = dict(zip(INPUT_NAMES, (input_ids, token_type_ids, attention_mask), strict=True))
        start, end = self.session.run(list(OUTPUT_NAMES), feeds)
        return start, end


class LiteRTRunner:
    """A .tflite from export_litert (or export_litert_step) on the LiteRT interpreter (XNNPACK for
    the float and int8 ops): numpy arrays in the order of `inputs`, those of `outputs` back.

    Tensors are found through the model's signature, whose names the converter takes from
    litert_convert.py (the raw tensor names carry prefixes such as serving_default_)."""

    def __init__(self, path: str | os.PathLike, threads: int, name: str = "litert",
                 inputs: tuple[str, ...] = INPUT_NAMES, outputs: tuple[str, ...] = OUTPUT_NAMES):
        self.name, self.version = name, ai_edge_litert.__version__
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        # Once, and before the signature runner exists (the interpreter refuses to allocate while
        # another object holds it). Calls then set tensors by index: the signature runner's own
        # __call__ would resize and re-allocate every time.
        self.interpreter.allocate_tensors()
        signatures = self.interpreter.get_signature_list()
        expected = {"inputs": sorted(inputs), "outputs": sorted(outputs)}
        if [{k: sorted(names) for k, names in s.items()} for s in signatures.values()] != [expected]:
            raise ValueError(
                f"{path}: signatures {signatures}, expected one with {expected}; "
                "convert it with canao.compile.peers.export_litert or export_litert_step"
            )
        signature = self.interpreter.get_signature_runner(next(iter(signatures)))
        details_in, details_out = signature.get_input_details(), signature.get_output_details()
        self.inputs = [(details_in[n]["index"], details_in[n]["dtype"]) for n in inputs]
        self.output_indices = [details_out[n]["index"] for n in outputs]

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        for (index, dtype), x in zip(self.inputs, arrays, strict=True):
            self.interpreter.set_tensor(index, x.astype(dtype, copy=False))
        self.interpreter.invoke()
        return tuple(self.interpreter.get_tensor(index) for index in self.output_indices)


class TVMRunner:
    """The compiled TVM library on this machine's CPU (the benchmark times it on the device lab instead)."""

    def __init__(self, path: str | os.PathLike, threads: int, name: str = "tvm"):
        # TVM sizes its thread pool from the environment when it first runs something.
        os.environ["TVM_NUM_THREADS"] = str(threads)
        import tvm
        from tvm import relax

        self.name, self.version, self._tensor = name, f"tvm {tvm.__version__}", tvm.runtime.tensor
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())

    def __call__(self, input_ids, token_type_ids, attention_mask):
        start, end = self.vm["main"](*(self._tensor(x) for x in (input_ids, token_type_ids, attention_mask)))
        return start.numpy(), end.numpy()


# The peers by name, as stage configs list them, and where each lives inside an artifact directory.
PEER_FILES = {
    "onnxruntime": "onnx/model.onnx",
    "onnxruntime-int8": "onnx/model-int8.onnx",
    "litert": "litert/model.tflite",
    "litert-int8": "litert/model-int8.tflite",
}
RUNNERS = {
    "tvm": TVMRunner,
    "torch": TorchRunner,
    "onnxruntime": OnnxRunner,
    "onnxruntime-int8": OnnxRunner,
    "litert": LiteRTRunner,
    "litert-int8": LiteRTRunner,
}


def export(name: str, model_dir: str | os.PathLike, model: SpanLogits, seq_len: int, out_dir: str | os.PathLike,
           int8_dot: bool) -> Path:
    """Peer `name`'s file for the model of `model_dir` (`model`: the same, from load_for_export),
    written to out_dir/PEER_FILES[name], for a CPU with or without int8 dot products (`int8_dot`:
    canao.hardware.Hardware.int8_dot). onnxruntime-int8 quantizes the fp32 ONNX file, exporting
    it first if it is not there yet (it then stays beside the int8 one)."""
    if name not in PEER_FILES:
        raise ValueError(f"peer {name!r}: unknown; one of {list(PEER_FILES)}")
    path = Path(out_dir) / PEER_FILES[name]
    if name == "onnxruntime":
        return export_onnx(model, seq_len, path)
    if name == "onnxruntime-int8":
        fp32 = Path(out_dir) / PEER_FILES["onnxruntime"]
        if not fp32.is_file():
            export_onnx(model, seq_len, fp32)
        return quantize_onnx_int8(fp32, path, int8_dot)
    return export_litert(model_dir, seq_len, path, int8=name == "litert-int8")


def runner(name: str, path: str | os.PathLike, threads: int) -> Runner:
    """A runner for backend `name` (tvm or a peer with `path` its file, or torch with `path` the model directory)."""
    if name not in RUNNERS:
        raise ValueError(f"backend {name!r}: unknown; one of {list(RUNNERS)}")
    return RUNNERS[name](path, threads, name=name)


def time_calls(runner, inputs: list, warmup: int, runs: int) -> list[float]:
    """Milliseconds of each of `runs` calls runner(*inputs), after `warmup` untimed ones."""
    for _ in range(warmup):
        runner(*inputs)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        runner(*inputs)
        times.append((time.perf_counter() - started) * 1000)
    return times
