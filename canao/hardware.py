"""The hardware a number depends on, resolved once, and the defaults that follow from it.

A device key names a profile, not a chip: `x86-1t` is "one core of this machine's CPU", and
machines of one kind differ (a Zen 3 has AVX2 but no AVX-512, BF16 or VNNI; a Zen 4 has all
three). What was measured or tuned on one CPU is wrong on another, so every latency model,
tuning database and benchmark record carries the `Hardware` it was made on, and reusing one
made on other hardware is refused (`check_same`) unless the user says to.

The same description decides the hardware-dependent defaults: bfloat16 autocast only where the
CPU (or GPU) computes bfloat16 natively (emulated, one MiniLM training step took 74 s against
3.2 s in fp32 on a Zen 3: ../shared/TOOLCHAIN.md), torch threads from the cores this process may
run on, and ONNX Runtime's 7-bit int8 weights where the CPU has no int8 dot-product instructions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# The ISA features that change which kernels run, by the name a record gives them -> the flag
# /proc/cpuinfo reports ("flags" on x86, "Features" on ARM, where NEON is "asimd").
ISA_FLAGS = {
    "avx2": "avx2", "fma": "fma", "avx512": "avx512f", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8",
    "neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "bf16": "bf16", "sve": "sve",
}
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # bfloat16 arithmetic in hardware
INT8_DOT = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "dotprod", "i8mm"})  # int8 dot products, no saturation


class HardwareMismatch(ValueError):
    """Something measured or tuned on other hardware than the device it would be used for."""


@dataclasses.dataclass(frozen=True)
class Hardware:
    cpu: str  # model name, with family and model on x86 ("AMD EPYC, family 25 model 1"); remote: its description
    arch: str  # x86_64, aarch64, ...; a remote device: its target's triple
    isa: tuple[str, ...]  # the ISA_FLAGS features it has, sorted
    cores: int  # cores the device runs on
    mcpu: str  # the CPU LLVM (and so TVM) compiles for, e.g. "znver4"; "" where the profile names none

    @property
    def int8_dot(self) -> bool:
        return bool(INT8_DOT & set(self.isa))

    def label(self) -> str:
        """One line for a record, a header or an error: 'AMD EPYC, family 25 model 1 (znver3; avx2 fma; 1 core)'."""
        cores = f"{self.cores} core{'s' if self.cores != 1 else ''}"
        return f"{self.cpu} ({'; '.join(x for x in (self.mcpu, ' '.join(self.isa) or 'no listed ISA', cores) if x)})"

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Hardware:
        return cls(**{**data, "isa": tuple(data["isa"])})


def read_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(the CPU's name, its flags) from the text of /proc/cpuinfo (its first processor)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: the others repeat it
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("CPU part") or platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name = f"{name}, family {fields['cpu family']} model {fields['model']}"
    return name, set((fields.get("flags") or fields.get("Features") or "").split())


@functools.cache
def host_cpu() -> tuple[str, tuple[str, ...]]:
    """This machine's CPU: its name and its ISA_FLAGS features (sorted); cheap, without TVM."""
    try:
        name, flags = read_cpuinfo(CPUINFO.read_text())
    except OSError:
        name, flags = platform.processor() or "unknown CPU", set()
    return name, tuple(sorted(feature for feature, flag in ISA_FLAGS.items() if flag in flags))


@functools.cache
def host(cores: int | None = None) -> Hardware:
    """This machine's CPU, on `cores` cores (default: those this process may run on)."""
    import tvm  # lazy: a second or two to import; LLVM's name of the host CPU is what `mcpu: host` builds for

    name, isa = host_cpu()
    return Hardware(cpu=name, arch=platform.machine(), isa=isa, cores=cores or len(os.sched_getaffinity(0)),
                    mcpu=tvm.target.codegen.llvm_get_system_cpu())


def declared(target: dict, description: str, cores: int) -> Hardware:
    """A remote device as its profile declares it (its own CPU cannot be read from here): the
    target's triple, CPU and +attributes."""
    isa = sorted(a.lstrip("+") for a in target.get("mattr", []) if a.startswith("+"))
    return Hardware(cpu=description, arch=target.get("mtriple", "unknown"), isa=tuple(isa), cores=cores,
                    mcpu=target.get("mcpu", ""))


def check_same(recorded: dict | None, current: Hardware, what: str, reuse: bool) -> None:
    """Refuse `what` (e.g. "outputs/tuning/x86-1t: tuning database"), made on the `recorded`
    hardware, for use on `current`, naming both; with `reuse` the user has said to use it anyway."""
    if recorded is not None and Hardware.from_dict(recorded) == current:
        return
    made_on = Hardware.from_dict(recorded).label() if recorded is not None else "hardware it does not record"
    message = f"{what}: made on {made_on}, not on this device's {current.label()}"
    if reuse:
        print(f"warning: {message}; used anyway (reuse_other_hardware)", flush=True)
        return
    raise HardwareMismatch(f"{message}; measure or tune again (another --out or tuning_dir), or set "
                           f"reuse_other_hardware=true to use it anyway")


def autocast_bf16(setting: bool | str, device_type: str, cpu: tuple[str, tuple[str, ...]] | None = None
                  ) -> tuple[bool, str]:
    """Whether training autocasts to bfloat16, and why: `setting` True or False forces it; "auto"
    turns it on only where `device_type` ("cpu", "cuda") computes bfloat16 natively (`cpu`: the
    CPU's name and features, default this machine's: `host_cpu()`)."""
    if isinstance(setting, bool):
        return setting, f"bf16={'true' if setting else 'false'} set in the config"
    if device_type == "cuda":
        import torch

        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return native, f"{torch.cuda.get_device_name()} {'computes' if native else 'lacks'} bfloat16 natively"
    name, isa = cpu or host_cpu()
    native = sorted(NATIVE_BF16 & set(isa))
    if native:
        return True, f"{name} computes bfloat16 natively ({', '.join(native)})"
    return False, f"{name} has no native bfloat16 (none of {', '.join(sorted(NATIVE_BF16))}), so fp32"


def threads(setting: int) -> int:
    """Inference or training threads: `setting`, or with 0 one per core this process may run on
    (torch's own default counts the machine's cores, not the ones the process is given)."""
    return setting or len(os.sched_getaffinity(0))


def torch_threads(setting: int) -> int:
    """Set torch's intra-op threads by `threads(setting)`; the count set."""
    import torch

    count = threads(setting)
    torch.set_num_threads(count)
    return count
