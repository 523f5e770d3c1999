"""``phenoscope profile``: per-well table → treatment profiles, NSC/mAP metrics, figures, HTML report."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="normalise, sphere, aggregate and evaluate a profile table", description=__doc__)
    p.add_argument("table", help="per-cell or per-well table (.csv/.csv.gz/.parquet); metadata columns start with Metadata_")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="TOML/JSON file with phenoscope.profiling.pipeline.ProfileConfig options")
    p.add_argument("--controls", help="query selecting control rows, e.g. \"Metadata_Compound == 'DMSO'\"")
    p.add_argument("--sphere-method", help="ZCA, ZCA-cor, PCA, PCA-cor, or '' for none")
    p.add_argument("--batch-column", help="metadata column for NSCB (e.g. Metadata_Batch)")
    p.add_argument("--no-figures", dest="figures", action="store_const", const=False, help="skip figures and report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phenoscope.config import load_config
    from phenoscope.profiling.pipeline import ProfileConfig, read_table, run_profile

    cfg = load_config(ProfileConfig, args.config, controls=args.controls, sphere_method=args.sphere_method,
                      batch_column=args.batch_column, figures=args.figures)
    metrics = run_profile(read_table(args.table), cfg, args.out)
    print(json.dumps(metrics, indent=2))
    return 0
