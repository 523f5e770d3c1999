"""``phenoscope`` command line: a thin layer over the Python API.

Each subcommand lives in its own module ``phenoscope.cli.<name>`` defining
``add_parser(subparsers)`` (which sets ``func`` to a callable taking the parsed args
and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order shown by --help. Missing modules are skipped.
SUBCOMMANDS = ("demo", "segment", "train", "pretrain", "embed", "profile", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phenoscope", description=__doc__.splitlines()[0])
    from phenoscope import __version__

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: jobs have saved what they can resume from
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
