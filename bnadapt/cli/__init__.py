"""The ``bnadapt`` command: parse, call one library function, print, write.

Each command family lives in a module of this package that exposes ``register(subparsers)``; it adds
its parsers and sets ``func`` to a function ``(args) -> int``. Errors:

- bad input (:class:`~bnadapt.errors.BnadaptError`): one line ``error: ...``, exit code 2;
- a bug (any other exception): one line naming it, exit code 1; ``--debug`` prints the traceback;
- a closed output pipe (``bnadapt zoo --json | head -1``): quiet exit;
- Ctrl-C: one line, exit code 130 (commands that can resume say so).
"""

from __future__ import annotations

import os

# Before torch is imported: idle OpenMP threads sleep instead of spinning, so a shared machine does
# not collapse throughput (docs/performance.md, "Threads"). A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from bnadapt import __version__  # noqa: E402
from bnadapt.errors import WRITE_ERRNOS, BnadaptError, write_error  # noqa: E402

# Modules that register subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "bnadapt.cli.noise",
    "bnadapt.cli.adapt",
    "bnadapt.cli.stream",
    "bnadapt.cli.certify",
    "bnadapt.cli.attack",
    "bnadapt.cli.train",
    "bnadapt.cli.corruptions",
    "bnadapt.cli.reproduce",
    "bnadapt.cli.zoo",
    "bnadapt.cli.inspect",
]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="bnadapt", description="Test-time adaptive batch normalization for robust classifiers "
                                                "(Nandy et al.): noise, certification, attacks, corruptions.")
    parser.add_argument("--version", action="version", version=f"bnadapt {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for p in sub.choices.values():  # --debug after the command too
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _quiet_broken_pipe() -> int:
    # Python flushes stdout at exit; point it at devnull so that flush cannot raise again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed on one line)
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    from bnadapt.results import set_argv

    set_argv(["bnadapt", *(sys.argv[1:] if argv is None else argv)])
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BnadaptError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OSError as e:  # a file system that refuses a write found late (no space, read-only, ...)
        if e.errno not in WRITE_ERRNOS:
            return _internal(e, debug)
        if debug:
            traceback.print_exc()
        print(f"error: {write_error(e.filename or 'a file', e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; commands with --resume continue where they stopped", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, traceback behind --debug
        return _internal(e, debug)


def _internal(e: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    print(f"error: internal error ({msg}); rerun with --debug for the traceback and report it", file=sys.stderr)
    return 1
