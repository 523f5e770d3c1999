"""``phenoscope segment INPUT... --out DIR``: segment images into label TIFFs and per-cell tables.

A thin layer over :func:`phenoscope.segment.load_model` (or ``segment_classic`` for ``--model classic``).
A bad file is reported on one line and the batch goes on; the exit code is 1 if any file failed.
Images whose outputs already exist are skipped unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import glob
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from phenoscope.core.io import IMAGE_SUFFIXES, imread

OUTPUT_SUFFIXES = ("_masks.tif", "_cells.csv", "_seg.npy", "_outlines.png", "_rois.zip")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("segment", help="segment cells in 2D images (Cellpose-SAM or classic)",
                              description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--model", default="default",
                   help="'default' (the shipped model), a weights file (.safetensors of ours, or a cellpose cpsam "
                        "file), or 'classic' (Otsu + watershed)")
    p.add_argument("--diameter", type=parse_diameter, default=None,
                   help="typical cell diameter in px (resizes to 30 px), or 'auto': estimated from a first pass")
    p.add_argument("--flow-threshold", type=float, default=0.4)
    p.add_argument("--cellprob-threshold", type=float, default=0.0)
    p.add_argument("--min-size", type=int, default=15, help="smallest mask kept, in px")
    p.add_argument("--tile-overlap", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8, help="256² tiles per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--channel-axis", type=int, default=None, help="channel axis of the images (default: guess)")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    p.add_argument("--save-seg", action="store_true", help="also write a cellpose-compatible <stem>_seg.npy")
    p.add_argument("--save-outlines", action="store_true", help="also write an outline overlay <stem>_outlines.png")
    p.add_argument("--save-rois", action="store_true", help="also write ImageJ ROIs <stem>_rois.zip")
    p.add_argument("--save-geojson", action="store_true",
                   help="also write QuPath detections <stem>_cells.geojson (one polygon per cell, with its measurements)")
    p.add_argument("--cp-names", nargs="?", const="", default=None, metavar="CHANNELS",
                   help="name the per-cell table's columns as CellProfiler does (Cells_AreaShape_*, ...); "
                        "optional comma-separated channel names (default C0, C1, ...)")
    p.set_defaults(func=run)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.endswith(OUTPUT_SUFFIXES)


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders (their images, not recursive) and globs; returns (files, problems)."""
    files: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _is_image(p))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if _is_image(Path(p)))
        if not found:
            problems.append(f"{item}: no images found")
        files.extend(f for f in found if f not in files)
    return files, problems


def _outputs(out: Path, stem: str, args: argparse.Namespace) -> list[Path]:
    wanted = ["_masks.tif", "_cells.csv"]
    wanted += ["_seg.npy"] * args.save_seg + ["_outlines.png"] * args.save_outlines + ["_rois.zip"] * args.save_rois
    wanted += ["_cells.geojson"] * args.save_geojson
    return [out / f"{stem}{suffix}" for suffix in wanted]


def parse_diameter(text: str) -> float | str:
    """``--diameter`` (also of the benchmarks): a positive number of px, or 'auto'."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a diameter in px or 'auto', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"diameter must be > 0 px, got {text}")
    return value


def _segmenter(args: argparse.Namespace) -> Callable[[np.ndarray], tuple]:
    """image → (masks, flows or None, cellprob or None, diameter used in px or None)."""
    if args.model == "classic":
        from phenoscope.segment.classic import segment_classic

        return lambda image: (segment_classic(image, channel_axis=args.channel_axis, min_size=args.min_size), None, None, None)
    from phenoscope.segment.inference import load_model
    from phenoscope.segment.options import MaskOptions

    model = load_model(args.model, device=args.device)

    def run_model(image: np.ndarray):
        options = MaskOptions(args.flow_threshold, args.cellprob_threshold, args.min_size)
        res = model.segment(image, args.channel_axis, args.diameter, options, args.tile_overlap, args.batch_size, args.tta)
        return res.masks, res.flows, res.cellprob, res.diameter

    return run_model


def process_one(path: Path, segment: Callable, args: argparse.Namespace) -> int:
    """Segment one file and write its outputs; returns the number of cells."""
    from phenoscope.segment import outputs
    from phenoscope.segment.preprocess import to_yxc

    image = imread(path)
    yxc = to_yxc(image, args.channel_axis, max_channels=image.size)  # validates axes; keeps all channels
    masks, flows, cellprob, diameter = segment(image)  # raises on NaN/inf (normalisation)
    stem, out = path.stem, args.out
    outputs.write_masks(out / f"{stem}_masks.tif", masks)
    if args.cp_names is not None:
        from phenoscope.interop.cellprofiler import write_cp_cell_table

        table = write_cp_cell_table(out / f"{stem}_cells.csv", masks, yxc, [n for n in args.cp_names.split(",") if n])
    else:
        table = outputs.write_cell_table(out / f"{stem}_cells.csv", masks, yxc)
    if args.save_geojson:
        from phenoscope.interop.geojson import write_geojson

        write_geojson(out / f"{stem}_cells.geojson", masks, table,
                      label_column="label" if "label" in table else "Metadata_ObjectNumber")
    if args.save_seg:
        outputs.write_seg_npy(out / f"{stem}_seg.npy", path, masks, flows, cellprob, diameter)
    if args.save_outlines:
        outputs.write_overlay_png(out / f"{stem}_outlines.png", yxc, masks)
    if args.save_rois:
        outputs.write_imagej_rois(out / f"{stem}_rois.zip", masks)
    return int(masks.max(initial=0))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    files, problems = collect_inputs(args.inputs)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    stems = [f.stem for f in files]
    for stem in sorted({s for s in stems if stems.count(s) > 1}):
        print(f"error: several inputs share the name {stem!r}; their outputs would collide", file=sys.stderr)
        problems.append(stem)
    try:
        segment = _segmenter(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: --model {args.model}: {err}", file=sys.stderr)
        return 2
    failed = done = skipped = 0
    for path in tqdm(files, desc="segment", unit="image", disable=None):
        if not args.overwrite and all(p.exists() for p in _outputs(args.out, path.stem, args)):
            skipped += 1
            continue
        try:
            process_one(path, segment, args)
            done += 1
        except Exception as err:  # one bad file must not stop the batch
            failed += 1
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            prefix = "" if str(path) in msg else f"{path}: "
            tqdm.write(f"error: {prefix}{msg}", file=sys.stderr)
    print(f"segmented {done}, skipped {skipped} (already done), failed {failed}", file=sys.stderr)
    return 1 if failed or problems else 0
