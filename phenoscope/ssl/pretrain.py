"""Pretraining API: one config, one loop, four methods (dino, simclr, mae, mocov3)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from torch import nn

from phenoscope.config import to_dict
from phenoscope.core.checkpoint import Preprocessing, provenance
from phenoscope.core.io import IMAGE_SUFFIXES, atomic_write
from phenoscope.ssl.augment import AugmentConfig
from phenoscope.ssl.backbone import CellViT, ViTConfig
from phenoscope.ssl.baselines import MAEConfig, MoCoConfig, SimCLRConfig
from phenoscope.ssl.checkpoint import load_dinov2_backbone, save_backbone
from phenoscope.ssl.data import ArraySource, ChannelsAsSamples, FileSource, FOVCrops, MultiCropCollate, MultiCropDataset
from phenoscope.ssl.dino import DINOConfig
from phenoscope.train.loop import TrainConfig, setup_distributed, train

METHODS = ("dino", "simclr", "mae", "mocov3")


@dataclass
class DataConfig:
    """Where images come from: ``.npz`` files (array ``npz_key``), image files, or folders of them."""

    npz_key: str = "images"
    layout: str = "auto"  # channel layout of image files: CYX, YXC or auto
    fov_crop_size: int = 0  # > 0: random crops of this size from each field of view
    crops_per_image: int = 1
    max_images: int = 0  # 0 = all


@dataclass
class PretrainConfig:
    """Everything ``phenoscope pretrain`` needs; every section is a dataclass with defaults."""

    method: str = "dino"
    bag_of_channels: bool = False  # train a 1-channel ViT on every channel as its own image
    init_checkpoint: str = ""  # dinov2-format checkpoint to start from (channel expansion if needed)
    vit: ViTConfig = field(default_factory=ViTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    mocov3: MoCoConfig = field(default_factory=MoCoConfig)


def build_source(paths: list[str | Path], cfg: DataConfig):
    """Image source from ``.npz`` files, image files and folders (all concatenated)."""
    from torch.utils.data import ConcatDataset

    parts = []
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"data path not found: {p}")
        if p.suffix == ".npz":
            parts.append(ArraySource.from_npz(p, cfg.npz_key))
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)
    if files:
        parts.append(FileSource(files, cfg.layout))
    if not parts:
        raise ValueError(f"no images found in {[str(p) for p in paths]}")
    source = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if cfg.max_images:
        from torch.utils.data import Subset

        source = Subset(source, range(min(cfg.max_images, len(source))))
    if cfg.fov_crop_size:
        source = FOVCrops(source, cfg.fov_crop_size, cfg.crops_per_image)
    return source


def channel_stats(source, n_max: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """Per-channel mean and std over up to ``n_max`` random images (for ``normalize='dataset'``)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(source), size=min(n_max, len(source)), replace=False)
    x = np.stack([source[int(i)].reshape(source[int(i)].shape[0], -1) for i in idx]).astype(np.float64)
    mean, std = x.mean(axis=(0, 2)), x.std(axis=(0, 2))
    if (std <= 0).any():
        raise ValueError(f"constant channel(s) {np.flatnonzero(std <= 0).tolist()}: cannot normalise")
    return {"channel_mean": mean.tolist(), "channel_std": std.tolist()}


def build_backbone(cfg: PretrainConfig, in_chans: int) -> CellViT:
    """Random or checkpoint-initialised backbone with ``in_chans`` input channels."""
    if cfg.init_checkpoint:
        return load_dinov2_backbone(cfg.init_checkpoint, in_chans=in_chans, drop_path_rate=cfg.vit.drop_path_rate)
    return CellViT(ViTConfig(**{**to_dict(cfg.vit), "in_chans": in_chans}))


def build_objective(cfg: PretrainConfig, backbone: CellViT) -> nn.Module:
    """The objective module for ``cfg.method``."""
    if cfg.method == "dino":
        from phenoscope.ssl.dino import DINO

        return DINO(backbone, cfg.dino)
    from phenoscope.ssl.baselines import MAE, MoCo, SimCLR

    if cfg.method == "simclr":
        return SimCLR(backbone, cfg.simclr)
    if cfg.method == "mae":
        return MAE(backbone, cfg.mae, cfg.augment.global_size)
    if cfg.method == "mocov3":
        return MoCo(backbone, cfg.mocov3)
    raise ValueError(f"unknown method {cfg.method!r}; choose from {METHODS}")


def input_preprocessing(cfg: PretrainConfig) -> Preprocessing:
    """What the backbone's training inputs went through, for its checkpoint: normalisation (and its
    statistics), bag-of-channels, and the global-view size in pixels."""
    aug = cfg.augment
    return Preprocessing(normalize=aug.normalize, channel_mean=aug.channel_mean, channel_std=aug.channel_std,
                         bag_of_channels=cfg.bag_of_channels, input_size=aug.global_size)


def pretrain(cfg: PretrainConfig, data: list[str | Path], out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Pretrain a backbone; writes checkpoints, logs, ``config.json`` and ``backbone.safetensors``."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {METHODS}")
    out_dir = Path(out_dir)
    setup_distributed()  # no-op unless launched by torchrun
    source = build_source(data, cfg.data)
    n_chans = source[0].shape[0]
    if cfg.bag_of_channels:
        source = ChannelsAsSamples(source, n_chans)
    backbone = build_backbone(cfg, 1 if cfg.bag_of_channels else n_chans)
    objective = build_objective(cfg, backbone)
    augment = cfg.augment
    if cfg.method != "dino" and augment.n_local:
        augment = replace(augment, n_local=0)  # baselines use the two global views only
    if augment.normalize == "dataset" and augment.channel_mean is None:
        augment = replace(augment, **channel_stats(source))
    cfg = replace(cfg, augment=augment)
    dataset = MultiCropDataset(source, augment, seed=cfg.train.seed)
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_dir / "config.json", "w") as fh:
            json.dump(to_dict(cfg), fh, indent=2)
    summary = train(objective, dataset, cfg.train, out_dir, resume, MultiCropCollate(augment, backbone.cfg.patch_size))
    if main_process:
        save_backbone(objective.backbone, out_dir / "backbone.safetensors", input_preprocessing(cfg),
                      provenance(config=to_dict(cfg), data=[str(d) for d in data]))
    return summary
