"""Pretraining API: one config, one loop, every registered method (:mod:`phenoscope.ssl.registry`:
dino, simclr, mae, mocov3, byol) on any backbone: the SSL ViT (``backbone = "vit"``), a small-input
ResNet (``backbone = "cnn"``, :mod:`phenoscope.nn.cnn`) or a Cellpose-SAM encoder
(``backbone = "seg-<variant>"``, e.g. ``seg-nano``; saved as a ``seg-encoder`` checkpoint that
``phenoscope train --init-backbone`` starts segmentation training from)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, make_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from torch import nn

from phenoscope.config import to_dict
from phenoscope.core.checkpoint import Preprocessing, provenance
from phenoscope.core.io import IMAGE_SUFFIXES, atomic_write
from phenoscope.nn.backbone import Backbone, check_backbone
from phenoscope.nn.cnn import CellCNN, CNNConfig
from phenoscope.ssl.augment import AugmentConfig
from phenoscope.ssl.backbone import CellViT, ViTConfig
from phenoscope.ssl.checkpoint import load_dinov2_backbone, save_backbone
from phenoscope.ssl.data import ArraySource, ChannelsAsSamples, FileSource, FOVCrops, MultiCropCollate, MultiCropDataset
from phenoscope.ssl.registry import get_method, methods
from phenoscope.train.loop import TrainConfig, setup_distributed, train

METHODS = tuple(methods())
SEG_PREFIX = "seg-"


@dataclass
class DataConfig:
    """Where images come from: ``.npz`` files (array ``npz_key``), image files, or folders of them."""

    npz_key: str = "images"
    layout: str = "auto"  # channel layout of image files: CYX, YXC or auto
    fov_crop_size: int = 0  # > 0: random crops of this size from each field of view
    crops_per_image: int = 1
    max_images: int = 0  # 0 = all


@dataclass
class _CommonConfig:
    """Everything ``phenoscope pretrain`` needs; every section is a dataclass with defaults.

    ``backbone``: ``vit`` (the ``[vit]`` section, or ``init_checkpoint``), ``cnn`` (the ``[cnn]``
    section; no masked-token objectives: MAE, iBOT) or ``seg-<variant>``, the
    Cellpose-SAM encoder of that variant (``seg-nano`` ... ``seg-large``). Its images are prepared as for
    segmentation (:class:`SegmentationInputs`) and the views keep that scale (``[augment] normalize`` is
    replaced by identity ``dataset`` statistics), so the encoder is pretrained on the inputs it segments.
    Each registered method adds its own section.
    """

    method: str = "dino"
    backbone: str = "vit"
    bag_of_channels: bool = False  # train a 1-channel ViT on every channel as its own image
    init_checkpoint: str = ""  # start from: a dinov2-format checkpoint (vit; channels expanded if needed), or a
    # seg-encoder checkpoint or segmentation network whose encoder matches seg-<variant>
    vit: ViTConfig = field(default_factory=ViTConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# one section per registered method, named after it (``[dino]``, ``[mocov3]``, ...)
PretrainConfig = make_dataclass(
    "PretrainConfig",
    [(m.name, m.config, field(default_factory=m.config)) for m in methods().values()],
    bases=(_CommonConfig,),
    namespace={"__doc__": _CommonConfig.__doc__, "__module__": __name__},
)


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


class SegmentationInputs:
    """Images of a source prepared as segmentation prepares them (:func:`phenoscope.segment.preprocess.network_input`):
    (C, H, W) → (in_chans, H, W) float32, each channel 1–99 % percentile-normalised, a gray image stored as
    identical planes merged to one if the network does so, zero-padded to ``in_chans``."""

    def __init__(self, source, in_chans: int, merge_identical: bool) -> None:
        self.source, self.in_chans, self.merge_identical = source, in_chans, merge_identical

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> np.ndarray:
        from phenoscope.segment.preprocess import padded_network_input

        return padded_network_input(np.asarray(self.source[i]), 0, self.in_chans, self.merge_identical)


def is_segmentation_backbone(cfg: PretrainConfig) -> bool:
    """Whether ``cfg.backbone`` names a Cellpose-SAM encoder (``seg-<variant>``)."""
    return cfg.backbone.startswith(SEG_PREFIX)


def backbone_names() -> tuple[str, ...]:
    """Accepted values of ``PretrainConfig.backbone``."""
    from phenoscope.segment.net import VARIANTS

    return ("vit", "cnn", *(SEG_PREFIX + name for name in VARIANTS))


def build_backbone(cfg: PretrainConfig, in_chans: int) -> Backbone:
    """Random or checkpoint-initialised backbone for images of ``in_chans`` channels.

    ``vit``: a :class:`CellViT` with ``in_chans`` channels; ``cnn``: a :class:`CellCNN` likewise.
    ``seg-<variant>``: the Cellpose-SAM encoder of that variant with a mask token (its own ``in_chans``;
    the data are zero-padded to it), random or the encoder of ``init_checkpoint`` (a ``seg-encoder``
    checkpoint or a segmentation network).
    """
    if cfg.backbone == "vit":
        if cfg.init_checkpoint:
            return load_dinov2_backbone(cfg.init_checkpoint, in_chans=in_chans, drop_path_rate=cfg.vit.drop_path_rate)
        return CellViT(ViTConfig(**{**to_dict(cfg.vit), "in_chans": in_chans}))
    if cfg.backbone not in backbone_names():
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {backbone_names()}")
    if cfg.bag_of_channels:
        raise ValueError(f"bag_of_channels applies to the vit backbone only, not {cfg.backbone!r}")
    if cfg.backbone == "cnn":
        if cfg.init_checkpoint:
            raise ValueError("init_checkpoint applies to the vit and seg-<variant> backbones, not cnn")
        return CellCNN(replace(cfg.cnn, in_chans=in_chans))
    from phenoscope.segment.checkpoint import load_encoder
    from phenoscope.segment.net import Encoder, variant

    net_cfg = variant(cfg.backbone.removeprefix(SEG_PREFIX))
    if in_chans > net_cfg.in_chans:
        raise ValueError(f"{cfg.backbone} takes at most {net_cfg.in_chans} channels, the data have {in_chans}")
    return load_encoder(cfg.init_checkpoint, net_cfg) if cfg.init_checkpoint else Encoder(net_cfg, mask_token=True)


def build_objective(cfg: PretrainConfig, backbone: Backbone) -> nn.Module:
    """The objective module of ``cfg.method`` (its section of ``cfg`` holds the options)."""
    method = get_method(cfg.method)
    return method.build(check_backbone(backbone), getattr(cfg, method.name), cfg.augment.global_size)


def save_pretrained(backbone: Backbone, path: Path, preprocessing: Preprocessing, record: dict[str, Any]) -> Path:
    """Write the trained backbone: kind ``vit`` / ``cnn`` for a :class:`CellViT` / :class:`CellCNN`,
    ``seg-encoder`` for a Cellpose-SAM encoder."""
    if isinstance(backbone, (CellViT, CellCNN)):
        return save_backbone(backbone, path, preprocessing, record)
    from phenoscope.segment.checkpoint import save_encoder

    return save_encoder(backbone, path, preprocessing, record)


def input_preprocessing(cfg: PretrainConfig) -> Preprocessing:
    """What the backbone's training inputs went through, for its checkpoint: normalisation (and its
    statistics; ``percentile`` for a segmentation encoder), bag-of-channels, and the global-view size in pixels."""
    aug = cfg.augment
    if is_segmentation_backbone(cfg):
        return Preprocessing(normalize="percentile", input_size=aug.global_size)
    return Preprocessing(normalize=aug.normalize, channel_mean=aug.channel_mean, channel_std=aug.channel_std,
                         bag_of_channels=cfg.bag_of_channels, input_size=aug.global_size)


@dataclass
class Pretraining:
    """What :func:`pretrain` trains: the resolved config (local crops off for methods without them,
    ``dataset`` statistics filled in), the objective, the augmented dataset and its collate function."""

    cfg: PretrainConfig
    objective: nn.Module
    dataset: MultiCropDataset
    collate: MultiCropCollate


def prepare_pretraining(cfg: PretrainConfig, data: list[str | Path]) -> Pretraining:
    """Build the source, backbone, objective and views of ``cfg`` on ``data`` as :func:`pretrain` trains them."""
    method = get_method(cfg.method)
    source = build_source(data, cfg.data)
    n_chans = source[0].shape[0]
    if is_segmentation_backbone(cfg):  # as segmentation reads images: a constant last plane (alpha) is no channel
        while n_chans > 1 and np.ptp(source[0][n_chans - 1]) == 0:
            n_chans -= 1
    if cfg.bag_of_channels:
        source = ChannelsAsSamples(source, n_chans)
    backbone = build_backbone(cfg, 1 if cfg.bag_of_channels else n_chans)
    objective = build_objective(cfg, backbone)
    augment = cfg.augment
    if is_segmentation_backbone(cfg):
        source = SegmentationInputs(source, backbone.in_chans, backbone.cfg.merge_identical_channels)
        augment = replace(augment, normalize="dataset", channel_mean=[0.0] * backbone.in_chans,
                          channel_std=[1.0] * backbone.in_chans)
    if not method.local_crops and augment.n_local:
        augment = replace(augment, n_local=0)  # the method uses the two global views only
    if augment.normalize == "dataset" and augment.channel_mean is None:
        augment = replace(augment, **channel_stats(source))
    return Pretraining(replace(cfg, augment=augment), objective, MultiCropDataset(source, augment, seed=cfg.train.seed),
                       MultiCropCollate(augment, backbone.patch_size))


def pretrain(cfg: PretrainConfig, data: list[str | Path], out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Pretrain a backbone; writes checkpoints, logs, ``config.json`` and ``backbone.safetensors``
    (kind ``vit``, ``cnn`` or ``seg-encoder``)."""
    out_dir = Path(out_dir)
    setup_distributed()  # no-op unless launched by torchrun
    run = prepare_pretraining(cfg, data)
    cfg = run.cfg
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_dir / "config.json", "w") as fh:
            json.dump(to_dict(cfg), fh, indent=2)
    summary = train(run.objective, run.dataset, cfg.train, out_dir, resume, run.collate)
    if main_process:
        save_pretrained(run.objective.backbone, out_dir / "backbone.safetensors", input_preprocessing(cfg),
                        provenance(config=to_dict(cfg), data=[str(d) for d in data]))
    return summary
