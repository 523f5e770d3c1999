"""``phenoscope segment-zarr IMAGE.zarr --out OUT.zarr``: segment a 2D image of any size block by block.

A thin layer over :func:`phenoscope.segment.blocks.segment_zarr`: the cells are those of one whole-image
run (each cell is owned by the block holding its centre), labels go to ``OUT.zarr/labels/<name>`` as
OME-Zarr and the per-cell table to ``OUT_<name>.parquet``. ``--workers N`` starts a dask LocalCluster,
``--scheduler ADDRESS`` uses a running one. A killed run resumes: finished blocks are not redone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("segment-zarr", help="segment a huge 2D zarr / OME-Zarr image block by block (dask)",
                              description=__doc__.splitlines()[0])
    p.add_argument("image", help="a zarr array or OME-Zarr image (2D: YX, CYX or YXC)")
    p.add_argument("--out", required=True, type=Path,
                   help="OME-Zarr group for the labels (may be the input image's own group)")
    p.add_argument("--name", default="cells", help="the labels' name under OUT/labels/ (default cells)")
    p.add_argument("--model", default="default", help="'default' or a weights file")
    p.add_argument("--diameter", type=float, default=None,
                   help="cell diameter in px (default: the model's estimate on the central 2048² px)")
    p.add_argument("--block", type=int, default=1024, help="block (core) size in px (default 1024)")
    p.add_argument("--overlap", type=int, default=None, help="context around each block in px (default: 2 diameters)")
    p.add_argument("--channel-axis", type=int, default=None, help="channel axis of a bare 3D array (default: guess)")
    p.add_argument("--flow-threshold", type=float, default=0.4)
    p.add_argument("--cellprob-threshold", type=float, default=0.0)
    p.add_argument("--min-size", type=int, default=15, help="smallest mask kept, in px")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--workers", type=int, default=1, help="worker processes of a dask LocalCluster (1: this process)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="a running dask.distributed scheduler")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phenoscope.batch import DaskExecutor, SerialExecutor
    from phenoscope.segment.blocks import segment_zarr
    from phenoscope.segment.options import MaskOptions

    if args.scheduler or args.workers > 1:
        executor = DaskExecutor(args.scheduler, max(1, args.workers))
    else:
        executor = SerialExecutor()
    summary = segment_zarr(args.image, args.out, args.model, args.diameter, args.block, args.overlap,
                           MaskOptions(args.flow_threshold, args.cellprob_threshold, args.min_size), args.name,
                           args.channel_axis, tta=args.tta, executor=executor, device=args.device)
    for line in summary["failed"]:
        print(f"error: {line}", file=sys.stderr)
    if summary["failed"]:
        print(f"{len(summary['failed'])} of {summary['blocks']} blocks failed; a rerun redoes only those", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
