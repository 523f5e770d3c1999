"""``phenoscope profile``: per-well table → treatment profiles, NSC/mAP metrics with p-values, figures, HTML report.

The table is a .csv/.csv.gz/.parquet with Metadata_* columns (one row per well, or per cell/image,
aggregated to wells first), or the shipped BBBC021 folder. Exit code 2 with one error line, and
nothing written, when the table or the options do not fit (missing columns, controls that match
nothing, a plate without controls).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="normalise, sphere, aggregate and evaluate a profile table", description=__doc__)
    p.add_argument("table", help="per-well (or per-cell/image) table .csv/.csv.gz/.parquet, or the BBBC021 folder; metadata columns start with Metadata_")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="TOML/JSON file with phenoscope.profiling.pipeline.ProfileConfig options (e.g. configs/profile/bbbc021.toml)")
    p.add_argument("--controls", help="query selecting control rows, e.g. \"Metadata_Compound == 'DMSO'\"")
    p.add_argument("--label-column", help="MoA label column (default Metadata_MoA; '' for no MoA evaluation)")
    p.add_argument("--compound-column", help="compound column for NSC (default Metadata_Compound)")
    p.add_argument("--sphere-method", help="ZCA, ZCA-cor, PCA, PCA-cor, or '' for none")
    p.add_argument("--batch-column", help="metadata column for NSCB (e.g. Metadata_Batch)")
    p.add_argument("--null-size", type=int, help="permutation null size for mAP p-values (default 10000)")
    p.add_argument("--no-figures", dest="figures", action="store_const", const=False, help="skip figures and report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phenoscope.config import load_config
    from phenoscope.profiling.pipeline import ProfileConfig, read_table, run_profile

    try:
        cfg = load_config(ProfileConfig, args.config, controls=args.controls, label_column=args.label_column,
                          compound_column=args.compound_column, sphere_method=args.sphere_method,
                          batch_column=args.batch_column, null_size=args.null_size, figures=args.figures)
    except (ValueError, FileNotFoundError, TypeError) as err:
        return _fail(args.config or "options", err)
    try:
        metrics = run_profile(read_table(args.table), cfg, args.out)
    except (ValueError, FileNotFoundError) as err:
        return _fail(args.table, err)
    print(json.dumps(metrics, indent=2))
    return 0


def _fail(where: str, err: Exception) -> int:
    """Print one error line naming ``where``; exit code 2."""
    print(f"error: {where}: {' '.join(str(err).split())}", file=sys.stderr)
    return 2
