"""The peer runtimes a compiled model is measured against: PyTorch eager, ONNX Runtime, LiteRT.

Exports write one model for each runtime; runners run any of them (and the TVM library, in
this process) through one interface, so the benchmark, the numerics checks and the servers
treat every backend alike. A family names its model's inputs and outputs and gives the model
(canao.qa.compile, canao.lm.generator); nothing here knows what the model computes.

PyTorch is imported where an export needs it, not here: a benchmark times every peer in a
fresh process (`timed_calls`), and a process that imports only its runtime starts in a fraction
of a second where one that imports PyTorch and transformers takes seconds (measured, 2026-12-07).
"""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import ai_edge_litert
import numpy as np
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter

from canao.config import PROJECT_ROOT
from canao.lab import devices

if TYPE_CHECKING:
    import torch

    from canao.lab.devices import Device

# LayerNormalization became a standard op in opset 17; ORT 1.32 runs it fused.
ONNX_OPSET = 17


def export_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], input_names: tuple[str, ...],
                output_names: tuple[str, ...], path: str | os.PathLike) -> Path:
    """`model` as ONNX with the static shapes of `inputs`, through the legacy TorchScript exporter:
    with eager attention it runs faster in ORT than the dynamo export (TOOLCHAIN.md)."""
    import torch

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
            inputs,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
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
    from onnxruntime.quantization import QuantType, quantize_dynamic  # needs onnx: the pipeline extra, not serving

    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(Path(fp32_path), int8_path, per_channel=True, weight_type=QuantType.QInt8,
                     reduce_range=not int8_dot)
    return int8_path


def litert_python() -> Path:
    """The converter environment's python: CANAO_LITERT_PYTHON, else the project's .venv-litert."""
    return Path(os.environ.get("CANAO_LITERT_PYTHON", PROJECT_ROOT / ".venv-litert" / "bin" / "python"))


def convert_litert(script: str, model_dir: str | os.PathLike, path: str | os.PathLike, options: list[str]) -> Path:
    """Run the converter module `script` (canao.qa.litert, canao.lm.litert) in the converter's own
    environment, litert-torch cannot be installed beside TVM (TOOLCHAIN.md), to write `path` from
    the model of `model_dir`; `options`: the script's own."""
    python = litert_python()
    if not python.is_file():
        raise FileNotFoundError(
            f"{python}: no LiteRT converter environment; run `make litert-env` (or set CANAO_LITERT_PYTHON)"
        )
    path = Path(path)
    command = [str(python), "-m", script, "--model", str(model_dir), *options, "--out", str(path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        stderr_tail = "\n".join(done.stderr.strip().splitlines()[-30:])
        raise RuntimeError(f"{script} failed (exit {done.returncode}) converting {model_dir} to {path}:\n{stderr_tail}")
    return path


class Runner(Protocol):
    """One backend running one exported model: numpy arrays in (the model's inputs, in order),
    its outputs back as a tuple. Calls are timed, so they do no setup."""

    name: str
    version: str

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]: ...


class OnnxRunner:
    def __init__(self, path: str | os.PathLike, threads: int, name: str, inputs: tuple[str, ...],
                 outputs: tuple[str, ...]):
        self.name, self.version, self.inputs, self.outputs = name, ort.__version__, inputs, outputs
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(list(self.outputs), dict(zip(self.inputs, arrays, strict=True))))


class LiteRTRunner:
    """A .tflite from canao.compile.peers.convert_litert on the LiteRT interpreter (XNNPACK for
    the float and int8 ops): numpy arrays in the order of `inputs`, those of `outputs` back.

    Tensors are found through the model's signature, whose names the converter takes from the
    converted module (the raw tensor names carry prefixes such as serving_default_)."""

    def __init__(self, path: str | os.PathLike, threads: int, name: str, inputs: tuple[str, ...],
                 outputs: tuple[str, ...]):
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
                "convert it with canao.compile.peers.convert_litert"
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
    """A compiled TVM library's "main" on this machine's CPU (the benchmark times it on the device lab instead)."""

    def __init__(self, path: str | os.PathLike, threads: int, name: str = "tvm"):
        # TVM sizes its thread pool from the environment when it first runs something.
        os.environ["TVM_NUM_THREADS"] = str(threads)
        import tvm
        from tvm import relax

        self.name, self.version, self._tensor = name, f"tvm {tvm.__version__}", tvm.runtime.tensor
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        outputs = self.vm["main"](*(self._tensor(x) for x in arrays))
        return tuple(o.numpy() for o in outputs)


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


def timed_calls(device: Device, make_runner, inputs: list, warmup: int, runs: int) -> tuple[list[float], str]:
    """In a child process (canao.processes.call_in_child): pin to `device`'s cores and thread
    count, then `time_calls` the runner `make_runner()` builds: (ms of each run, its version).
    `make_runner` (a class, or a functools.partial of one) is imported in the child by its
    module, so a peer's child imports this module and its runtime only."""
    devices.pin(device)
    runner = make_runner()
    return time_calls(runner, inputs, warmup, runs), runner.version
