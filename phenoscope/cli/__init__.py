"""``phenoscope`` command line: a thin layer over the Python API.

Each subcommand lives in its own module ``phenoscope.cli.<name>`` defining
``add_parser(subparsers)`` (which sets ``func`` to a callable taking the parsed args
and returning an exit code). Building the parser imports no heavy library: the modules
import torch and the rest inside the functions that run a subcommand.

Exit codes: 0 success; 1 some files of a batch failed (listed at the end); 2 a usage or input
error found before any work (one ``error:`` line; ``--debug`` shows the traceback); 130 / 143
interrupted by Ctrl-C / SIGTERM (with the batch summary).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

__all__ = ["EXPECTED_ERRORS", "SUBCOMMANDS", "build_parser", "main"]

# Subcommand modules, in the order shown by --help. Missing modules are skipped.
SUBCOMMANDS = ("demo", "segment", "segment_zarr", "train", "pretrain", "fewshot", "embed", "profile", "export")
# Failures a user can fix (bad input, missing or unreadable files): one line, exit code 2.
EXPECTED_ERRORS = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    """The ``phenoscope`` parser with every subcommand (each also takes ``--debug``)."""
    from phenoscope import __version__

    parser = argparse.ArgumentParser(prog="phenoscope", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"phenoscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"phenoscope.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"phenoscope.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        if not any(a.dest == "threads" for a in p._actions):
            p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            from phenoscope.cli.common import apply_threads

            apply_threads(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: jobs have saved what they can resume from
        if not hasattr(stop, "exit_code"):  # a batch has printed its summary and the signal already
            print("interrupted", file=sys.stderr)
        return getattr(stop, "exit_code", 128 + signal.SIGINT)
    except EXPECTED_ERRORS as err:
        if args.debug:
            raise
        from phenoscope.batch import error_line

        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
