"""A stage's config of a profile: configs/<profile>/<stage>.yaml (or a file of the user's) as
the stage's dataclass, with `key=value` overrides (canao.config says how they are read).
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

import yaml

from canao.config import ConfigError, DeployConfig, LoadtestConfig, ServeConfig, apply_overrides, config_path, from_dict
from canao.lm.config import (
    GenBenchConfig,
    LMCompileConfig,
    LMDataConfig,
    LMDeployConfig,
    LMDistillConfig,
    LMFinalizeConfig,
    LMLatencyConfig,
    LMSearchConfig,
    LMTeacherConfig,
)
from canao.qa.config import (
    BenchConfig,
    CompileConfig,
    DistillConfig,
    FinalizeConfig,
    LatencyConfig,
    SearchConfig,
    TeacherConfig,
)

STAGES: dict[str, type] = {
    "teacher": TeacherConfig, "distill": DistillConfig, "latency": LatencyConfig, "search": SearchConfig,
    "finalize": FinalizeConfig, "compile": CompileConfig, "bench": BenchConfig, "deploy": DeployConfig,
    "serve": ServeConfig, "loadtest": LoadtestConfig,
    "lm-teacher": LMTeacherConfig, "lm-data": LMDataConfig, "distill-lm": LMDistillConfig,
    "latency-lm": LMLatencyConfig, "search-lm": LMSearchConfig, "finalize-lm": LMFinalizeConfig,
    "compile-lm": LMCompileConfig,
    "bench-lm": GenBenchConfig, "deploy-lm": LMDeployConfig,
}


def load_config(stage: str, profile: str | None = None, file: str | os.PathLike | None = None,
                overrides: typing.Iterable[str] = ()):
    """Load the config of `stage` from an explicit file or the profile's file, then overrides."""
    if stage not in STAGES:
        raise ConfigError(f"stage: unknown {stage!r} (known: {', '.join(STAGES)})")
    path = Path(file) if file else config_path(stage, profile or "quick")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return from_dict(STAGES[stage], apply_overrides(data, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
