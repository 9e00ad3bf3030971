"""Load only the CPU tensor intrinsics of TVM, for MetaSchedule on CPU targets.

`tvm.s_tir.tensor_intrin` registers the intrinsics of every target when imported: 25 s on
our build machine, 16.5 of them CUDA's. MetaSchedule imports it in the tuning process and
again in every builder and runner worker it starts, each round; with the CPU ones alone a
round costs seconds instead of half a minute. Kept free of other imports: workers load it.
"""

import importlib
import importlib.util
import sys
import types

PACKAGE = "tvm.s_tir.tensor_intrin"
CPU_MODULES = ("x86", "arm_cpu")


def install() -> None:
    """Make `PACKAGE` a package holding just the CPU intrinsics (no-op once it is imported)."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    package = types.ModuleType(PACKAGE)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[PACKAGE] = package
    for name in CPU_MODULES:
        setattr(package, name, importlib.import_module(f"{PACKAGE}.{name}"))
