"""The arguments several subcommands share: a stage's config, a model on a device, a QA predictor.
"""

from __future__ import annotations

import argparse

from canao.config import PROFILES


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=PROFILES, default="quick", help="config profile (default: quick)")
    p.add_argument("--config", help="a config YAML instead of the profile's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=1 (repeatable)")


def add_model_on_device_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--model", required=True, help="model directory (save_pretrained layout)")
    p.add_argument("--device", required=True, help="device key from device_lab/devices.yaml")
    p.add_argument("--seq-len", type=int, required=True, help="static sequence length")


def add_predictor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (save_pretrained layout) or compiled artifact")
    p.add_argument("--backend", default="auto",
                   help="a compiled artifact's backend (auto: the fastest within its numerics bound)")
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the windowing, e.g. --set max_seq_len=256")
