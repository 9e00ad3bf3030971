"""The compiler stage: a transformers QA model -> TVM Relax -> tuned, device-specific module.

torch.export traces the model at one static sequence length; the Relax importer binds the
weights as constants (so weight transposes fold away at compile time); a fast GELU and
TVM's fast-math pass replace erf/exp with polynomial approximations; operators are fused;
MetaSchedule tunes every fused kernel that the device's tuning database does not hold yet
(the database is per device and shared by every compile, so a search's many subnets tune
each kernel shape once); `tvm.compile` builds the module. The result must match PyTorch
within `numerics_tol` or no artifact is written. The same model is exported for the peer
runtimes (ONNX Runtime, LiteRT) into the same artifact directory, so the benchmark compares
like with like.

Decoder LMs (`compile_lm`) go the same way, through the same `build_checked`: a prefill and
a decode step over a static KV cache, each a library of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from canao.compile import peers, tvm_cpu_intrinsics
from canao.config import resolve_path, to_dict
from canao.hardware import Hardware, check_same
from canao.lab import devices, rpc
from canao.lab.devices import Device
from canao.lm import model as lm_model
from canao.lm.config import LMCompileConfig
from canao.manifest import staged_dir, write_manifest, write_text_atomic
from canao.qa.config import CompileConfig
from canao.qa.model import example_inputs, load_for_export, load_tokenizer

TVM_LIBRARY = "tvm/model.so"
TUNING_HARDWARE = "hardware.json"  # in a tuning database's directory: the Hardware it was tuned on


class NumericsError(ValueError):
    """A compiled model whose outputs differ from PyTorch's by more than the tolerance."""


def import_relax(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    """torch.export at the inputs' static shapes -> Relax IRModule with weights as constants."""
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        exported = torch.export.export(model, inputs)
    return from_exported_program(exported, keep_params_as_input=False)


def fast_math(mod):
    """GELU through TVM's polynomial erf, then TVM's fast exp/erf/tanh/softmax everywhere."""
    import tvm
    from tvm import relax, topi
    from tvm.relax.expr_functor import PyExprMutator, mutator

    def gelu(x):
        return topi.multiply(topi.multiply(x, 0.5), topi.add(topi.fast_erf(topi.multiply(x, 0.7071067811865476)), 1.0))

    @mutator
    class FastGelu(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.gelu":
                return self.builder_.call_te(gelu, call.args[0], primfunc_name_hint="fast_gelu")
            return call

    rewriter = FastGelu(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.FastMathTransform()(rewriter.builder_.get())


@contextlib.contextmanager
def _locked(directory: Path):
    """One writer at a time per tuning database (concurrent compiles for one device)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_tuning_database(tuning_dir: Path, hardware: Hardware, reuse_other_hardware: bool) -> None:
    """Check that the tuning database in `tuning_dir` was tuned on `hardware` (kernels tuned for
    another CPU are slow or wrong on this one), recording it in a new database; the caller holds
    the directory's lock."""
    record = tuning_dir / TUNING_HARDWARE
    if record.is_file():
        recorded = json.loads(record.read_text())
    elif any(tuning_dir.glob("database_*.json")):
        recorded = None  # tuned before canao recorded the hardware
    else:
        write_text_atomic(record, json.dumps(hardware.to_dict(), indent=1) + "\n")
        return
    check_same(recorded, hardware, f"{tuning_dir}: tuning database", reuse_other_hardware)


def tune_and_build(mod, target, cfg: CompileConfig, tuning_dir: Path, hardware: Hardware) -> tuple[object, dict]:
    """Fuse, tune the kernels the database lacks, apply the database, build. Returns the
    executable and what tuning did (tasks, tasks reused from the database, seconds)."""
    import tvm
    from tvm import relax

    tvm_cpu_intrinsics.install()
    from tvm.s_tir import meta_schedule as ms

    with target:
        mod = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.pipeline.zero_pipeline(),
        ])(mod)
    started = time.perf_counter()
    with _locked(tuning_dir):
        open_tuning_database(tuning_dir, hardware, cfg.reuse_other_hardware)
        database = ms.database.JSONDatabase(work_dir=str(tuning_dir))
        tasks = ms.relax_integration.extract_tasks(mod, target)
        # A kernel the database has seen is not tuned again, even when none of its candidates
        # ran (some kernels have no valid schedule in the space; they keep TVM's default).
        new = [t for t in tasks if not database.has_workload(t.dispatched[0])]
        if new and cfg.trials > 0:
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(new, str(tuning_dir))
            ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(tuning_dir), database=database,
                max_trials_global=cfg.trials, max_trials_per_task=cfg.max_trials_per_task,
                builder=ms.builder.LocalBuilder(initializer=tvm_cpu_intrinsics.install),
                runner=ms.runner.LocalRunner(initializer=tvm_cpu_intrinsics.install),
            )
            # With a budget that covers every new kernel's share, each was tried: record them all as
            # seen. With less, kernels the budget never reached keep no record and are tuned later.
            if cfg.trials >= len(new) * cfg.max_trials_per_task:
                for task in new:
                    database.commit_workload(task.dispatched[0])
        with target:
            mod = relax.transform.MetaScheduleApplyDatabase(str(tuning_dir))(mod)
    tuning = {
        "tasks": len(tasks),
        "tasks_reused": len(tasks) - len(new),
        "tasks_tuned_now": len(new) if cfg.trials > 0 else 0,
        "trials": cfg.trials,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return tvm.compile(mod, target=target), tuning


def max_abs_diff(outputs, reference) -> float:
    return max(float(np.max(np.abs(np.asarray(o) - np.asarray(r)))) for o, r in zip(outputs, reference, strict=True))


def build_checked(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], reference: list[np.ndarray], device: Device,
                  cfg, library: Path, what: str) -> tuple[float, dict]:
    """`model` at the static shapes of `inputs` -> Relax (fast math if `cfg.fast_math`) -> tuned
    build for `device` -> `library`. Returns the max abs difference of the library's outputs on
    `inputs` from `reference` (PyTorch's), and what tuning did; over `cfg.numerics_tol` it
    raises NumericsError. `cfg` gives trials, max_trials_per_task, fast_math, numerics_tol, tuning_dir."""
    mod = import_relax(model, inputs)
    if cfg.fast_math:
        mod = fast_math(mod)
    executable, tuning = tune_and_build(mod, devices.tvm_target(device), cfg,
                                        resolve_path(cfg.tuning_dir) / device.key, device.hardware())
    library.parent.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(library))
    diff = max_abs_diff(_run_tvm(library, [t.numpy() for t in inputs], device), reference)
    if diff > cfg.numerics_tol:
        raise NumericsError(f"{what}: TVM output differs from PyTorch by {diff:.2e} "
                            f"(tolerance {cfg.numerics_tol:.0e}); no artifact written")
    return diff, tuning


def _new_out_dir(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; choose another --out")
    return out_dir


def compile_model(model_dir: str | Path, device: Device, cfg: CompileConfig, out_dir: str | Path) -> dict:
    """Compile `model_dir` for `device` into `out_dir` (TVM library, peer exports,
    tokenizer, config, manifest). Nothing is written unless every numerics check passes."""
    hardware = device.hardware()
    out_dir, model_dir = _new_out_dir(out_dir), Path(model_dir)
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
            path = peers.export(name, model_dir, model, cfg.seq_len, staging, hardware.int8_dot)
            backends[name] = path.relative_to(staging).as_posix()
            numerics[name] = max_abs_diff(peers.runner(name, path, threads=1)(*numpy_inputs), reference)
        load_tokenizer(model_dir).save_pretrained(staging)
        shutil.copy(model_dir / "config.json", staging / "config.json")
        manifest = write_manifest(
            staging, "compile",
            config={"device": device.key, "target": json.loads(str(devices.tvm_target(device))), **to_dict(cfg)},
            metrics={"numerics_max_abs_diff": numerics, "tuning": tuning},
            inputs={"model": str(model_dir.resolve())},
            backends=backends, hardware=hardware.to_dict(),
        )
    return manifest


# The decoder's two compiled steps, by phase, and where each lives inside an artifact directory.
LM_LIBRARIES = {"prefill": "tvm/prefill.so", "decode": "tvm/decode.so"}


def compile_lm(model_dir: str | Path, device: Device, cfg: LMCompileConfig, out_dir: str | Path) -> dict:
    """Compile a Llama-architecture causal LM of `model_dir` for `device` into `out_dir`: a
    prefill step (`cfg.prefill_len` tokens) and a decode step (one token) over a static KV cache
    of `cfg.max_context` positions (canao.lm.model.KVCacheStep), each checked against
    PyTorch on a cache of random contents; plus tokenizer, config and manifest."""

    out_dir, model_dir = _new_out_dir(out_dir), Path(model_dir)
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
            staging, "compile-lm",
            config={"device": device.key, "target": json.loads(str(devices.tvm_target(device))), **to_dict(cfg)},
            metrics={"numerics_max_abs_diff": numerics, "tuning": tuning},
            inputs={"model": str(model_dir.resolve())},
            backends=dict(LM_LIBRARIES), hardware=device.hardware().to_dict(),
            eos_token_ids=list(lm_model.eos_token_ids(model, tokenizer)),
        )
    return manifest



def _run_tvm(library: Path, inputs: list[np.ndarray], device: Device) -> list[np.ndarray]:
    """Outputs of the built library: on this machine for local devices, else on the device."""
    if not device.local:
        return rpc.run_remote(library, inputs, device.key)
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    return [o.numpy() for o in vm["main"](*[tvm.runtime.tensor(x) for x in inputs])]
