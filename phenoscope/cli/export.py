"""``phenoscope export-bioimageio MODEL --out model.zip``: package a segmentation model for the BioImage Model Zoo.

Writes a bioimage.io format 0.5 model (pytorch_state_dict + torchscript weights, test tensors, cover,
README) and, unless ``--no-test``, runs ``bioimageio.core.test_model`` on it. Needs ``phenoscope[bioimageio]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export-bioimageio", help="export a segmentation model as a bioimage.io model package",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="default", help="'default' (the shipped model) or a weights file")
    p.add_argument("--out", required=True, type=Path, help="package to write (.zip)")
    p.add_argument("--name", default=None, help="model name in the package (default: from the weights file)")
    p.add_argument("--author", action="append", default=None, help="an author's name (repeatable)")
    p.add_argument("--no-test", action="store_true", help="skip bioimageio.core's test of the written package")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out.suffix != ".zip":
        print(f"error: --out {args.out}: the package must be a .zip file", file=sys.stderr)
        return 2
    try:
        from phenoscope.interop.bioimageio import export_bioimageio
    except ModuleNotFoundError as err:
        print(f"error: {err.name} is not installed; pip install 'phenoscope[bioimageio]'", file=sys.stderr)
        return 2
    authors = tuple(args.author) if args.author else ("phenoscope maintainers",)
    try:
        report = export_bioimageio(args.model, args.out, name=args.name, authors=authors)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {args.model}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {report.path}; torchscript vs phenoscope max |diff| = {report.max_abs_diff:.2e} on the test tensor")
    if args.no_test:
        return 0
    from bioimageio.core import test_model

    summary = test_model(report.path)
    print(f"bioimageio.core test_model: {summary.status}")
    if summary.status != "passed":
        print(summary.format(), file=sys.stderr)
        return 1
    return 0
