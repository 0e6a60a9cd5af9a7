"""The ``bnadapt`` command.

Each subcommand lives in the module that implements it: a module exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a function ``(args) -> int``.
Any :class:`~bnadapt.errors.BnadaptError` ends the command with one line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bnadapt.errors import BnadaptError

# Modules that register subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "bnadapt.commands",
    "bnadapt.train",
    "bnadapt.certify_cli",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bnadapt", description="Test-time adaptive batch normalization for robust classifiers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BnadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun with --resume where the command supports it", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
