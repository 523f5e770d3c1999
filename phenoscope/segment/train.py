"""Training and fine-tuning of Cellpose-SAM networks on image/label pairs.

``train_segmentation(cfg, images, labels, out_dir)`` is the whole pipeline:

1. pair image and label files by name, load and percentile-normalise the images (up to 3 channels;
   gray images stored as identical RGB planes become one channel);
2. compute the unit flows of every label image once and cache them (``.npy`` keyed by content hash);
3. split off a validation set (listed file stems, or a seeded fraction) and record the split;
4. train with the generic loop (:mod:`phenoscope.train.loop`) on :class:`CellposeLoss` — MSE on
   5·flows / 2 + BCE on the cell probability, as cellpose — with true layer drop, AdamW and
   cellpose's warm-up + step-decay schedule; validation AP@0.5 every ``val_every`` epochs;
5. write the trained network as ``model.safetensors`` + ``model.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from phenoscope.config import to_dict
from phenoscope.core.io import (
    IMAGE_SUFFIXES,
    atomic_path,
    atomic_write,
    imread,
    label_file_for,
)
from phenoscope.segment.augment import SegAugmentConfig, augment_sample
from phenoscope.segment.flows import diameter
from phenoscope.segment.net import CellposeSAMNet, NetConfig, build_net
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
    layer_drop: float = 0.0  # max per-block drop probability (cellpose-SAM trains cpsam with 0.4)
    min_images_per_epoch: int = 8  # small sets are repeated up to this many samples per epoch
    val_fraction: float = 0.1  # used when no val_ids file is given
    val_ids: str = ""  # file with one validation image stem per line
    val_every: int = 5  # epochs between validation runs (0: never)
    val_max_images: int = 0  # 0: all validation images
    cache_dir: str = ""  # flow cache (default: <out>/flow_cache)
    augment: SegAugmentConfig = field(default_factory=SegAugmentConfig)
    train: SegLoopConfig = field(default_factory=SegLoopConfig)


@dataclass
class Sample:
    """One training image: normalised (3, H, W) image, (2, H, W) unit flows, labels and diameter."""

    image: np.ndarray
    flows: np.ndarray
    labels: np.ndarray
    diameter: float


def find_pairs(images: str | Path, labels: str | Path) -> list[tuple[Path, Path]]:
    """Match every image in ``images`` to ``labels/<stem>{,_masks,_labels,...}.<ext>``; error lists the unmatched."""
    images, labels = Path(images), Path(labels)
    for d in (images, labels):
        if not d.is_dir():
            raise FileNotFoundError(f"not a folder: {d}")
    pairs, missing = [], []
    for img in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        lab = label_file_for(img, labels)
        (pairs.append((img, lab)) if lab is not None else missing.append(img.name))
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no label file in {labels}: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    if not pairs:
        raise ValueError(f"no images found in {images}")
    return pairs


def load_training_image(path: Path, in_chans: int = 3, merge_identical: bool = True) -> np.ndarray:
    """(in_chans, H, W) float32, each channel 1–99 % normalised, zero-padded to ``in_chans``.

    Prepared exactly as at inference (:func:`phenoscope.segment.model.network_input`): with
    ``merge_identical`` a gray image saved as RGB(A) becomes one channel.
    """
    from phenoscope.segment.model import network_input

    x = network_input(imread(path), None, in_chans, merge_identical)
    out = np.zeros((in_chans, *x.shape[1:]), np.float32)
    out[: x.shape[0]] = x
    return out


def cached_flows(labels: np.ndarray, cache_dir: Path | None) -> np.ndarray:
    """Unit flows (2, H, W) of a label image, read from / written to ``cache_dir`` (keyed by content)."""
    from phenoscope.segment.flows import masks_to_flows

    if cache_dir is None:
        return masks_to_flows(labels)
    key = hashlib.sha1(np.ascontiguousarray(labels).tobytes() + str(labels.shape).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.npy"
    if path.exists():
        return np.load(path)
    flows = masks_to_flows(labels).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, flows)
    return flows


def load_samples(
    pairs: list[tuple[Path, Path]], cache_dir: Path | None, net_cfg: NetConfig, progress: bool = True
) -> list[Sample]:
    """Load every pair (image, labels); bad files are collected and reported together."""
    from tqdm.auto import tqdm

    from phenoscope.segment.flows import check_labels

    samples, errors = [], []
    for img_path, lab_path in tqdm(pairs, desc="load + flows", unit="image", disable=not progress, leave=False):
        try:
            image = load_training_image(img_path, net_cfg.in_chans, net_cfg.merge_identical_channels)
            labels = imread(lab_path)
            if labels.ndim != 2 or labels.shape != image.shape[1:]:
                raise ValueError(f"label image {lab_path.name} has shape {labels.shape}, image is {image.shape[1:]}")
            labels = check_labels(labels, f"label image {lab_path.name}").astype(np.int32)
            samples.append(Sample(image, cached_flows(labels, cache_dir), labels, diameter(labels)))
        except (ValueError, OSError) as err:
            errors.append(f"{img_path.name}: {err}")
    if errors:
        raise ValueError(f"{len(errors)} training pair(s) could not be used:\n  " + "\n  ".join(errors))
    return samples


def split_pairs(pairs: list[tuple[Path, Path]], cfg: SegTrainConfig) -> tuple[list, list]:
    """(train, val) pairs: the stems listed in ``cfg.val_ids``, else a seeded ``val_fraction``."""
    if cfg.val_ids:
        wanted = {s.strip() for s in Path(cfg.val_ids).read_text().splitlines() if s.strip() and not s.startswith("#")}
        unknown = wanted - {p[0].stem for p in pairs}
        if unknown:
            raise ValueError(f"{len(unknown)} validation id(s) in {cfg.val_ids} have no image, e.g. {sorted(unknown)[:3]}")
        val = [p for p in pairs if p[0].stem in wanted]
    else:
        n_val = int(round(cfg.val_fraction * len(pairs)))
        rng = np.random.default_rng(cfg.train.seed)
        chosen = set(rng.choice(len(pairs), size=n_val, replace=False).tolist()) if n_val else set()
        val = [p for i, p in enumerate(pairs) if i in chosen]
    val_set = {p[0] for p in val}
    return [p for p in pairs if p[0] not in val_set], val


class SegmentationDataset(Dataset):
    """Augmented tiles of :class:`Sample` s; tile ``i`` of epoch ``e`` is a pure function of (seed, e, i)."""

    def __init__(self, samples: list[Sample], cfg: SegAugmentConfig, tile: int, seed: int = 0, min_len: int = 8) -> None:
        if not samples:
            raise ValueError("no training images")
        self.samples, self.cfg, self.tile, self.seed, self.epoch = samples, cfg, tile, seed, 0
        self.length = max(len(samples), min_len)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i % len(self.samples)]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image, target = augment_sample(s.image, s.flows, s.labels > 0, s.diameter, self.tile, rng, self.cfg)
        return {"image": torch.from_numpy(image), "target": torch.from_numpy(target)}


def cellpose_loss(y: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cellpose ``_loss_fn_seg``: (MSE(y[:, :2], 5·flows) / 2, BCE-with-logits(y[:, 2], foreground)).

    y: (B, 3, H, W) network output (dY, dX, cellprob logits); target: (B, 3, H, W) (foreground, dY, dX).
    """
    flow = F.mse_loss(y[:, :2], 5.0 * target[:, 1:]) / 2.0
    prob = F.binary_cross_entropy_with_logits(y[:, 2], (target[:, 0] > 0.5).to(y.dtype))
    return flow, prob


class CellposeLoss(nn.Module):
    """Objective for the generic loop: the cellpose loss with per-step seeded layer drop, plus validation."""

    find_unused_parameters = True  # layer drop skips blocks

    def __init__(self, net: CellposeSAMNet, layer_drop: float = 0.0, seed: int = 0,
                 val: list[Sample] | None = None, val_every: int = 0) -> None:
        super().__init__()
        self.net, self.layer_drop, self.seed = net, layer_drop, seed
        self.val, self.val_every = val or [], val_every

    def forward(self, batch: dict[str, torch.Tensor], progress) -> dict[str, torch.Tensor]:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + progress.step) * 64 + rank)
        y = self.net(batch["image"], self.layer_drop, gen)
        flow, prob = cellpose_loss(y.float(), batch["target"])
        return {"loss": flow + prob, "flow_loss": flow.detach(), "prob_loss": prob.detach()}

    def on_epoch_end(self, epoch: int) -> dict[str, float] | None:
        last = epoch + 1
        if not self.val or not self.val_every or last % self.val_every:
            return None
        return validate(self.net, self.val)


def validate(net: CellposeSAMNet, samples: list[Sample], thresholds=(0.5, 0.75, 0.9)) -> dict[str, float]:
    """Mean AP (cellpose definition) of ``net`` on validation samples, at their native size."""
    from phenoscope.metrics import average_precision
    from phenoscope.segment.model import CellposeSAM

    device = next(net.parameters()).device
    model = CellposeSAM(net, device)
    preds = [model.segment(np.moveaxis(s.image, 0, -1), channel_axis=-1).masks for s in samples]
    ap = average_precision([s.labels for s in samples], preds, thresholds)[0].mean(axis=0)
    return {f"val_ap{int(round(100 * t))}": float(a) for t, a in zip(thresholds, ap)}


def initial_network(model: str) -> CellposeSAMNet:
    """A random network of a named variant, or one loaded from a weights file (to fine-tune)."""
    from phenoscope.segment.net import VARIANTS

    if model in VARIANTS:
        return build_net(model)
    from phenoscope.segment.checkpoint import load_network

    return load_network(model)


def train_segmentation(
    cfg: SegTrainConfig, images: str | Path, labels: str | Path, out_dir: str | Path, resume: bool = False
) -> dict[str, Any]:
    """Train (or fine-tune) a network; writes ``model.safetensors`` / ``.json``, logs and ``split.json`` to ``out_dir``."""
    import torch.distributed as dist

    from phenoscope.segment.checkpoint import save_model
    from phenoscope.train.loop import setup_distributed, train

    out_dir = Path(out_dir)
    rank, _, _ = setup_distributed()
    torch.manual_seed(cfg.train.seed)
    net = initial_network(cfg.model)
    train_pairs, val_pairs = split_pairs(find_pairs(images, labels), cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "flow_cache"
    samples = load_samples(train_pairs, cache, net.cfg, progress=rank == 0)
    val = load_samples(val_pairs, cache, net.cfg, progress=False)
    if cfg.val_max_images:
        val = val[: cfg.val_max_images]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_dir / "config.json", "w") as fh:
            json.dump({"config": to_dict(cfg), "images": str(images), "labels": str(labels)}, fh, indent=2)
        with atomic_write(out_dir / "split.json", "w") as fh:
            json.dump({"train": [p[0].stem for p in train_pairs], "val": [p[0].stem for p in val_pairs]}, fh, indent=1)
    dataset = SegmentationDataset(samples, cfg.augment, net.cfg.tile, cfg.train.seed, cfg.min_images_per_epoch)
    objective = CellposeLoss(net, cfg.layer_drop, cfg.train.seed, val, cfg.val_every)
    summary = train(objective, dataset, cfg.train, out_dir, resume)
    if rank == 0 and summary["finished"]:
        save_model(net.cpu(), out_dir / "model.safetensors")
    if dist.is_initialized():
        dist.barrier()
    return {**summary, "n_train": len(train_pairs), "n_val": len(val_pairs)}
