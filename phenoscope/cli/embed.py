"""``phenoscope embed INPUT... --model M --out DIR``: field-of-view or single-cell embeddings → Parquet + AnnData."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("embed", help="embed images or single cells with a ViT backbone", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True, help="backbone.safetensors (phenoscope pretrain) or a dinov2/Cell-DINO checkpoint")
    p.add_argument("--out", required=True, type=Path, help="output folder (embeddings.parquet, embeddings.h5ad, parts/)")
    p.add_argument("--masks", type=Path, default=None,
                   help="folder of label masks (<stem>_masks.tif from phenoscope segment, or <stem>.tif): single-cell mode")
    p.add_argument("--crop-size", type=int, default=None, help="single-cell crop size in px (default 64 with --masks)")
    p.add_argument("--mask-background", action="store_true", help="zero pixels outside each crop's own cell")
    p.add_argument("--center-crop", type=int, default=None, help="field-of-view mode: centre crop size in px")
    p.add_argument("--n-last-blocks", type=int, default=None, help="class tokens of the last n blocks (default 1)")
    p.add_argument("--layout", default=None, choices=("auto", "CYX", "YXC"), help="image axes (default: auto)")
    p.add_argument("--channels", type=_channel_list, default=None, metavar="0,1,2",
                   help="input channels to use, in order; repeat one to replicate a gray image (0,0,0). "
                        "Default: all (a constant alpha channel is dropped)")
    p.add_argument("--metadata", type=Path, default=None, help="CSV joined on its 'image' or 'Metadata_Image' column (file stems)")
    p.add_argument("--format", dest="output_format", default=None, choices=("h5ad", "zarr"), help="AnnData format (default h5ad)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", dest="num_workers", type=int, default=None,
                   help="processes embedding images in parallel (≤ 1: in this process)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the images on a dask.distributed cluster: a scheduler address, or 'local' (a LocalCluster of --workers)")
    p.add_argument("--config", default=None, help="TOML/JSON file with EmbedConfig options")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.set_defaults(func=run)


def _channel_list(text: str) -> list[int]:
    """``--channels``: comma-separated channel indices."""
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated channel indices such as 0,1,2, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from phenoscope.batch import BatchInterrupted, check_writable, collect_inputs
    from phenoscope.config import load_config
    from phenoscope.core.io import IMAGE_SUFFIXES, label_file_for
    from phenoscope.segment.files import OUTPUTS
    from phenoscope.ssl.embed import EmbedConfig, embed_images

    crop = args.crop_size if args.crop_size is not None else (64 if args.masks else None)
    cfg = load_config(EmbedConfig, args.config, crop_size=crop, mask_background=args.mask_background or None,
                      center_crop=args.center_crop, n_last_blocks=args.n_last_blocks, layout=args.layout,
                      output_format=args.output_format, batch_size=args.batch_size, num_workers=args.num_workers,
                      channels=args.channels, scheduler=args.scheduler)
    if cfg.crop_size and args.masks is None:
        print("error: --crop-size (single-cell mode) needs --masks", file=sys.stderr)
        return 2
    # images (or .npz crop stacks) beside their masks are fine; parts are numbered, not named by stem
    files = collect_inputs(args.inputs, (*IMAGE_SUFFIXES, ".npz"), tuple(OUTPUTS.values()), unique_stems=False)
    check_writable(args.out)
    masks = [label_file_for(f, args.masks) for f in files] if args.masks else None
    metadata = None
    if args.metadata:
        metadata = pd.read_csv(args.metadata).rename(columns={"image": "Metadata_Image"})
        metadata["Metadata_Image"] = metadata["Metadata_Image"].map(lambda s: Path(str(s)).stem)
    try:
        summary = embed_images(files, args.model, args.out, cfg, masks, metadata, args.device)
    except BatchInterrupted as stop:
        for line in stop.report.failure_lines():
            print(f"error: {line}", file=sys.stderr)
        print(f"{stop.report.summary('embedded')}; {stop}", file=sys.stderr)
        raise
    for line in summary["failed"]:
        print(f"error: {line}", file=sys.stderr)
    print(json.dumps({k: (len(v) if k == "failed" else v) for k, v in summary.items()}))
    return 1 if summary["failed"] else 0
