"""``phenoscope fewshot``: the CUPre few-shot benchmark grid (inits × label fractions × seeds) on a source
and a target domain; rerun the same command to continue a stopped grid."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fewshot", help="CUPre few-shot benchmark: pretrain, fine-tune, score, plot",
                              description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="TOML/JSON benchmark file (FewShotConfig), e.g. configs/fewshot/dsb_he.toml")
    p.add_argument("--out", required=True,
                   help="output folder: phases/, runs/<init>/<p>pc_seed<s>/model.safetensors, results.csv, summary.csv, fewshot.png, report.html")
    p.add_argument("--inits", nargs="+", default=None, metavar="INIT", help="subset of: scratch ssl source cupre cupre++")
    p.add_argument("--fractions", nargs="+", type=int, default=None, metavar="PERCENT", help="labelled target fractions in %%")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phenoscope.config import load_config
    from phenoscope.fewshot.grid import FewShotConfig, run_grid

    cfg = load_config(FewShotConfig, args.config, inits=args.inits, fractions=args.fractions, seeds=args.seeds)
    run_grid(cfg, args.out)
    print(f"wrote {args.out}/summary.csv, fewshot.png and report.html")
    return 0
