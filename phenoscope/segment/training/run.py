"""Training and fine-tuning of Cellpose-SAM networks on image/label pairs.

``train_segmentation(cfg, images, labels, out_dir)`` is the whole pipeline:

1. pair image and label files by name, load and percentile-normalise the images (up to 3 channels;
   gray images stored as identical RGB planes become one channel);
2. compute the unit flows of every label image once and cache them (``.npy`` keyed by content hash);
3. split off a validation set (listed file stems, or a seeded fraction) and record the split;
4. train with the generic loop (:mod:`phenoscope.train.loop`) on :class:`CellposeLoss` — MSE on
   5·flows / 2 + BCE on the cell probability, as cellpose — with true layer drop, AdamW and
   cellpose's warm-up + step-decay schedule; validation AP@0.5 every ``val_every`` epochs;
5. fit the size head (:mod:`phenoscope.segment.size`) on augmented training tiles of known cell diameter;
6. write the trained network as the self-describing checkpoint ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phenoscope.config import to_dict
from phenoscope.core.io import atomic_write
from phenoscope.segment.net import CellposeSAMNet, build_net, is_backbone
from phenoscope.segment.size import SizeFit
from phenoscope.segment.training.augment import SegAugmentConfig, augment_sample, log_uniform
from phenoscope.segment.training.data import (Sample, SegmentationDataset, find_pairs, read_ids, read_pairs, split_pairs,
                                               to_samples)
from phenoscope.segment.training.objective import CellposeLoss
from phenoscope.train.l2sp import L2SP
from phenoscope.train.loop import TrainConfig


@dataclass
class SegLoopConfig(TrainConfig):
    """Loop defaults of cellpose ``train_seg`` (batch 1, LR 5e-5, weight decay 0.1, step decay)."""

    epochs: int = 100
    batch_size: int = 1
    lr: float = 5e-5
    min_lr: float = 0.0
    warmup_epochs: float = 10.0
    schedule: str = "step"
    weight_decay: float = 0.1
    weight_decay_end: float = 0.1
    clip_grad: float = 1.0
    freeze_last_layer_epochs: int = 0


@dataclass
class SegTrainConfig:
    """Everything ``phenoscope train`` needs."""

    model: str = "tiny"  # variant name (nano, tiny, small, large) or a weights file to fine-tune
    init_backbone: str = ""  # seg-encoder checkpoint (phenoscope pretrain --backbone seg-<variant>) for the encoder
    skip: int = 0  # channels of a full-resolution refinement path to add (segment.net.FullResRefine); 0 = none
    size_tiles: int = 2048  # augmented tiles to fit the size head on after training (segment.size); 0 = no size head
    layer_drop: float = 0.0  # max per-block drop probability (cellpose-SAM trains cpsam with 0.4)
    min_images_per_epoch: int = 8  # small sets are repeated up to this many samples per epoch
    val_fraction: float = 0.1  # used when no val_ids file is given
    val_ids: str = ""  # file with one validation image stem per line
    exclude_ids: str = ""  # file of image stems used neither for training nor validation (a held-out test split)
    train_ids: str = ""  # file of the image stems to train on (default: every pair not validated on or excluded)
    l2sp_strength: float = 0.0  # > 0: L2-SP (train.l2sp) of the encoder's ViT towards its starting weights, no weight decay on it
    l2sp_alpha: float = 0.5  # L2-SP: weight of the pull to the starting weights (1 - alpha: to zero)
    val_every: int = 5  # epochs between validation runs (0: never)
    val_max_images: int = 0  # 0: all validation images
    cache_dir: str = ""  # flow cache (default: <out>/flow_cache)
    augment: SegAugmentConfig = field(default_factory=SegAugmentConfig)
    train: SegLoopConfig = field(default_factory=SegLoopConfig)


def initial_network(model: str, init_backbone: str = "", skip: int = 0) -> CellposeSAMNet:
    """A random network of a named variant, or one loaded from a weights file (to fine-tune); with
    ``init_backbone``, its encoder is then replaced, strictly, by a pretrained ``seg-encoder`` checkpoint
    whose config must match the network's (``ValueError`` naming the file otherwise). ``skip`` > 0 adds a
    full-resolution refinement path of that many channels (a loaded network keeps its outputs at first)."""
    from phenoscope.segment.checkpoint import load_encoder_into, load_network
    from phenoscope.segment.net import VARIANTS, variant, with_refine

    net = build_net(variant(model, skip=skip)) if model in VARIANTS else load_network(model)
    if init_backbone:
        load_encoder_into(net, init_backbone)
    if skip and net.cfg.skip != skip:
        net = with_refine(net, skip)
    return net


def anchored_backbone(net: CellposeSAMNet, cfg: SegTrainConfig) -> L2SP | None:
    """L2-SP over the ViT of ``net`` (names as :class:`CellposeLoss` sees them, ``net.*``) anchored at its
    current weights, or None when ``cfg.l2sp_strength`` is 0."""
    if not cfg.l2sp_strength:
        return None
    return L2SP([(f"net.{n}", p) for n, p in net.named_parameters() if is_backbone(n)], cfg.l2sp_alpha, cfg.l2sp_strength)


def fit_size(
    net: CellposeSAMNet, samples: list[Sample], cfg: SegAugmentConfig, tiles: int = 2048, seed: int = 0
) -> tuple[CellposeSAMNet, SizeFit]:
    """Fit ``net``'s size head (added if missing) on ``tiles`` augmented tiles of the samples with cells:
    each is resized so that its cells are ``diam_mean · f`` px across, f drawn from ``cfg.scale_range``.
    Returns (network, fit record)."""
    from phenoscope.segment.size import fit_size_head

    usable = [s for s in samples if s.diameter > 0]
    if not usable:
        raise ValueError("no training image has cells: the size head cannot be fitted (set size_tiles = 0)")

    def draw(rng: np.random.Generator, i: int) -> tuple[np.ndarray, float]:
        s, f = usable[i], log_uniform(rng, cfg.scale_range)
        image, _ = augment_sample(s.image, s.flows, s.labels > 0, s.diameter, net.cfg.tile, rng, cfg, f=f)
        return image, cfg.diam_mean * f

    return fit_size_head(net, draw, len(usable), tiles, seed=seed)


def train_segmentation(
    cfg: SegTrainConfig, images: str | Path, labels: str | Path, out_dir: str | Path, resume: bool = False
) -> dict[str, Any]:
    """Train (or fine-tune) a network; writes ``model.safetensors`` / ``.json``, logs and ``split.json`` to ``out_dir``."""
    import torch.distributed as dist

    from phenoscope.core.checkpoint import provenance
    from phenoscope.segment.checkpoint import save_model
    from phenoscope.train.loop import setup_distributed, train

    out_dir = Path(out_dir)
    rank, _, _ = setup_distributed()
    torch.manual_seed(cfg.train.seed)
    net = initial_network(cfg.model, cfg.init_backbone, cfg.skip)
    listed = None  # with train_ids, only the listed and validation images need labels
    if cfg.train_ids:
        listed = read_ids(cfg.train_ids) | (read_ids(cfg.val_ids) if cfg.val_ids else set())
    train_pairs, val_pairs = split_pairs(find_pairs(images, labels, listed), cfg.val_ids, cfg.val_fraction, cfg.train.seed,
                                        cfg.exclude_ids, cfg.train_ids)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "flow_cache"
    train_read, val_read = read_pairs(train_pairs, net.cfg), read_pairs(val_pairs, net.cfg)  # all checked before any write
    samples = to_samples(train_read, cache, progress=rank == 0)
    val = to_samples(val_read, cache, progress=False)
    if cfg.val_max_images:
        val = val[: cfg.val_max_images]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_dir / "config.json", "w") as fh:
            json.dump({"config": to_dict(cfg), "images": str(images), "labels": str(labels)}, fh, indent=2)
        with atomic_write(out_dir / "split.json", "w") as fh:
            json.dump({"train": [p[0].stem for p in train_pairs], "val": [p[0].stem for p in val_pairs]}, fh, indent=1)
    dataset = SegmentationDataset(samples, cfg.augment, net.cfg.tile, cfg.train.seed, cfg.min_images_per_epoch)
    objective = CellposeLoss(net, cfg.layer_drop, cfg.train.seed, val, cfg.val_every, anchored_backbone(net, cfg))
    summary = train(objective, dataset, cfg.train, out_dir, resume)
    if rank == 0 and summary["finished"]:
        net = net.cpu()
        if cfg.size_tiles:
            try:
                net, fit = fit_size(net, samples, cfg.augment, cfg.size_tiles, cfg.train.seed)
                summary["size_fit"] = dataclasses.asdict(fit)
            except ValueError as err:  # too few cells: the trained flows are still worth saving
                warnings.warn(f"size head not fitted ({err}); the model segments at native size by default", stacklevel=2)
        record = provenance(config=to_dict(cfg), images=str(images), labels=str(labels))
        save_model(net, out_dir / "model.safetensors", record)
    if dist.is_initialized():
        dist.barrier()
    return {**summary, "n_train": len(train_pairs), "n_val": len(val_pairs)}
