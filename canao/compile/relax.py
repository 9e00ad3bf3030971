"""The TVM backend every family compiles through: a torch module -> Relax -> tuned,
device-specific library, checked against PyTorch.

torch.export traces the module at its inputs' static shapes; the Relax importer binds the
weights as constants (so weight transposes fold away at compile time); a fast GELU and
TVM's fast-math pass replace erf/exp with polynomial approximations; operators are fused;
MetaSchedule tunes every fused kernel that the device's tuning database does not hold yet
(the database is per device and shared by every compile, so a search's many subnets tune
each kernel shape once); `tvm.compile` builds the library. The result must match PyTorch
within `numerics_tol` or no artifact is written. The families' compile stages
(canao.qa.compile: a QA model and its peer exports; canao.lm.compile: a decoder's prefill
and decode steps over a static KV cache) build through `build_checked`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from canao.compile import tvm_cpu_intrinsics
from canao.config import config_hash, resolve_path, to_dict
from canao.hardware import Hardware, check_same
from canao.lab import devices, rpc
from canao.lab.devices import Device
from canao.manifest import read_manifest, sha256_file, write_text_atomic

COMPILED_CACHE = "outputs/compiled"  # compiled artifacts by device and content hash, relative to the project root
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


def tune_and_build(mod, target, cfg, tuning_dir: Path, hardware: Hardware) -> tuple[object, dict]:
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


def artifact_config(device: Device, cfg) -> dict:
    """What an artifact's manifest records of how it was compiled: the device, its TVM target, the config."""
    return {"device": device.key, "target": json.loads(str(devices.tvm_target(device))), **to_dict(cfg)}


def new_out_dir(out_dir: str | Path) -> Path:
    """`out_dir`, which a compile must create itself."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; choose another --out")
    return out_dir


def compiled(model_dir: str | Path, device: Device, cfg, compile_fn) -> Path:
    """The artifact that `compile_fn(model_dir, device, cfg, out_dir)` (canao.qa.compile.compile_model,
    canao.lm.compile.compile_lm) makes, compiled on first use and kept in
    outputs/compiled/<device>/<weights, config and hardware hash>/ for later runs on that hardware."""
    model_dir = Path(model_dir)
    fingerprint = sha256_file(model_dir / "model.safetensors") + config_hash(cfg)
    key = hashlib.sha256((fingerprint + device.hardware().fingerprint()).encode()).hexdigest()[:16]
    out = resolve_path(COMPILED_CACHE) / device.key / key
    if read_manifest(out) is None:
        compile_fn(model_dir, device, cfg, out)
    return out


def _run_tvm(library: Path, inputs: list[np.ndarray], device: Device) -> list[np.ndarray]:
    """Outputs of the built library: on this machine for local devices, else on the device."""
    if not device.local:
        return rpc.run_remote(library, inputs, device.key)
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    return [o.numpy() for o in vm["main"](*[tvm.runtime.tensor(x) for x in inputs])]
