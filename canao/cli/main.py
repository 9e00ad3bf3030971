"""`canao <command>`: every stage and tool from the command line.

Stage commands take `--profile tiny|quick|full` (configs/<profile>/<stage>.yaml) or
`--config FILE`, and `--set key=value` overrides (dotted keys for nested sections). The
QA family's commands are in canao.cli.qa, the generation family's in canao.cli.lm, the
tools (compile, bench, lab, services, registry, serving, the pipeline) in canao.cli.tools.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from canao.cli import lm, qa, tools
from canao.config import ConfigError
from canao.mlops import registry, services
from canao.qa.data import SquadFormatError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canao", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for commands in (qa, lm, tools):
        commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["canao", *argv])  # what reproduces a figure, for the records that quote it
    try:
        code = args.func(args)  # a command returns an exit status only where it can end otherwise than 0
    except (ConfigError, SquadFormatError, FileNotFoundError, FileExistsError, ValueError, ConnectionError,
            registry.RegistryError, services.ServiceError) as e:
        print(f"canao {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
