"""``phenoscope segment INPUT... --out DIR``: segment images into label TIFFs and per-cell tables.

A thin layer over :func:`phenoscope.segment.files.segment_files`. Inputs, the output folder, the model
and the folder's run manifest are checked before any work (exit code 2). A bad file is reported on one
line at the end and the batch goes on (exit code 1). Images whose outputs exist are skipped unless
``--overwrite``; Ctrl-C / SIGTERM stop with the summary (exit code 130 / 143) and a rerun resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phenoscope.batch import BatchReport


def _diameter(text: str) -> float | str:
    from phenoscope.segment.files import parse_diameter

    return parse_diameter(text)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("segment", help="segment cells in 2D images (Cellpose-SAM or classic)",
                              description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--model", default="default",
                   help="'default' (the shipped model), a weights file (.safetensors of ours, or a cellpose cpsam "
                        "file), or 'classic' (Otsu + watershed)")
    p.add_argument("--diameter", type=_diameter, default=None,
                   help="typical cell diameter in px (resizes to 30 px), or 'auto': measured on the masks of a first pass "
                        "(default: the model's own size estimate; native size for a model without a size head)")
    p.add_argument("--flow-threshold", type=float, default=0.4)
    p.add_argument("--cellprob-threshold", type=float, default=0.0)
    p.add_argument("--min-size", type=int, default=15, help="smallest mask kept, in px")
    p.add_argument("--tile-overlap", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8, help="256² tiles per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--channel-axis", type=int, default=None, help="channel axis of the images (default: guess)")
    p.add_argument("--do-3d", action="store_true",
                   help="the inputs are volumes (ZYX or 4D with channels): 3D masks from the network's YX, ZY and ZX planes")
    p.add_argument("--z-axis", type=int, default=None, help="with --do-3d: the Z axis of the volumes (default 0)")
    p.add_argument("--anisotropy", type=float, default=None,
                   help="with --do-3d: Z spacing / XY spacing (e.g. 2 when planes are twice as far apart as pixels)")
    p.add_argument("--stitch-threshold", type=float, default=0.0, metavar="IOU",
                   help="with --do-3d: segment each Z plane in 2D and join masks of adjacent planes with IoU ≥ IOU "
                        "(cellpose's stitch mode) instead of 3D flows")
    p.add_argument("--overwrite", action="store_true",
                   help="redo images whose outputs exist, also when they come from another model or parameters")
    p.add_argument("--save-seg", action="store_true", help="also write a cellpose-compatible <stem>_seg.npy")
    p.add_argument("--save-outlines", action="store_true", help="also write an outline overlay <stem>_outlines.png")
    p.add_argument("--save-rois", action="store_true", help="also write ImageJ ROIs <stem>_rois.zip")
    p.add_argument("--save-geojson", action="store_true",
                   help="also write QuPath detections <stem>_cells.geojson (one polygon per cell, with its measurements)")
    p.add_argument("--cp-names", nargs="?", const="", default=None, metavar="CHANNELS",
                   help="name the per-cell table's columns as CellProfiler does (Cells_AreaShape_*, ...); "
                        "optional comma-separated channel names (default C0, C1, ...)")
    p.add_argument("--workers", type=int, default=1, help="processes segmenting images in parallel (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch default)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the files on a dask.distributed cluster: a scheduler address (tcp://host:8786), "
                        "or 'local' for a LocalCluster of --workers processes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phenoscope.batch import BatchInterrupted
    from phenoscope.segment.files import SegmentParams, segment_files
    from phenoscope.segment.options import MaskOptions

    params = SegmentParams(args.diameter, MaskOptions(args.flow_threshold, args.cellprob_threshold, args.min_size),
                           args.tile_overlap, args.tta, args.channel_axis, args.batch_size, args.do_3d,
                           0 if args.z_axis is None else args.z_axis, args.anisotropy, args.stitch_threshold)  # ValueError: one line, exit 2
    save = [kind for kind in ("seg", "outlines", "rois", "geojson") if getattr(args, f"save_{kind}")]
    cp_names = None if args.cp_names is None else [n for n in args.cp_names.split(",") if n]
    try:
        report = segment_files(args.inputs, args.out, args.model, params, save, args.overwrite, args.workers,
                               args.device, args.threads, on_done=lambda item, summary: summary.describe(item.source),
                               cp_names=cp_names, scheduler=args.scheduler)
    except BatchInterrupted as stop:
        _print_summary(stop.report, f"; {stop}")
        raise
    _print_summary(report)
    return 1 if report.failed else 0


def _print_summary(report: BatchReport, tail: str = "") -> None:
    """The failures (one line each), then the counts (stderr)."""
    for line in report.failure_lines():
        print(f"error: {line}", file=sys.stderr)
    print(report.summary("segmented") + tail, file=sys.stderr)
