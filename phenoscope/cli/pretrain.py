"""``phenoscope pretrain``: self-supervised pretraining (Cell-DINO, SimCLR, MAE, MoCo v3, BYOL) of a ViT, a
small-input ResNet or a segmentation encoder."""

from __future__ import annotations

import argparse
import json

from phenoscope.cli.common import LazyChoices, add_run_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="self-supervised pretraining of a ViT or CNN on cell images")
    p.add_argument("--method", choices=LazyChoices("phenoscope.ssl.pretrain", "METHODS"), metavar="METHOD", default=None,
                   help="objective: %(choices)s (default: config's, else dino)")
    p.add_argument("--backbone", default=None,
                   help="vit (default), cnn (the [cnn] section: a small-input ResNet) or "
                        "seg-nano|seg-tiny|seg-small|seg-large: the Cellpose-SAM encoder, for phenoscope train --init-backbone")
    p.add_argument("--data", nargs="+", required=True, help=".npz files, image files or folders")
    p.add_argument("--out", required=True, help="output folder (checkpoints, logs, backbone.safetensors)")
    p.add_argument("--config", default=None, help="TOML/JSON file with PretrainConfig sections")
    p.add_argument("--epochs", type=int, default=None, help="overrides [train] epochs (the schedules' length)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this wall time")
    p.add_argument("--batch-size", type=int, default=None, help="overrides [train] batch_size (per process)")
    add_run_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from phenoscope.config import load_config
    from phenoscope.ssl.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, method=args.method, backbone=args.backbone)
    loop = {"epochs": args.epochs, "max_minutes": args.max_minutes, "batch_size": args.batch_size}
    cfg = replace(cfg, train=replace(cfg.train, **{k: v for k, v in loop.items() if v is not None}))
    summary = pretrain(cfg, args.data, args.out, resume=args.resume)
    print(json.dumps(summary))
    return 0
