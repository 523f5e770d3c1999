"""``phenoscope train``: train or fine-tune a Cellpose-SAM network on image/label pairs."""

from __future__ import annotations

import argparse
import json

from phenoscope.cli.common import add_run_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train or fine-tune a segmentation network",
                              description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder of images (PNG/TIFF)")
    p.add_argument("--labels", required=True, help="folder of label images, same stems (optionally _masks), 0 = background")
    p.add_argument("--out", required=True, help="output folder: checkpoints, logs, split.json, model.safetensors")
    p.add_argument("--model", default=None, help="variant (nano, tiny, small, large) or weights file to fine-tune")
    p.add_argument("--init-backbone", default=None,
                   help="seg-encoder checkpoint (phenoscope pretrain --backbone seg-<variant>) to start the encoder from")
    p.add_argument("--config", default=None, help="TOML/JSON file with SegTrainConfig options ([augment], [train])")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--val-ids", default=None, help="file with one validation image stem per line")
    p.add_argument("--val-fraction", type=float, default=None, help="seeded validation fraction (without --val-ids)")
    p.add_argument("--val-every", type=int, default=None, help="epochs between validation AP runs (0: never)")
    p.add_argument("--save-every", type=int, default=None, help="epochs between checkpoints")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this wall time")
    add_run_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phenoscope.config import from_dict, load_config, to_dict
    from phenoscope.segment.training import SegLoopConfig, SegTrainConfig, train_segmentation

    cfg = load_config(SegTrainConfig, args.config, model=args.model, init_backbone=args.init_backbone, val_ids=args.val_ids,
                      val_fraction=args.val_fraction, val_every=args.val_every)
    loop = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "checkpoint_every": args.save_every, "max_minutes": args.max_minutes}
    cfg.train = from_dict(SegLoopConfig, {**to_dict(cfg.train), **{k: v for k, v in loop.items() if v is not None}})
    summary = train_segmentation(cfg, args.images, args.labels, args.out, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "last"} | {"last": summary["last"]}))
    return 0
