"""CUPre for torchvision's Mask R-CNN (ResNet-50-FPN, built with ``weights=None``: nothing is downloaded).

The split AMT² needs: the *backbone* is the ResNet body (``model.backbone.body``), the *neck* the FPN, the
*head* the RPN and RoI heads. The self-supervised phase trains the body through :class:`ResNetTokens`,
which gives it the :class:`phenoscope.nn.Backbone` interface, so the MoCo objective of
:mod:`phenoscope.ssl.moco` trains it unchanged. Every phase runs in the one training loop.

Images are prepared as for the flow model (each channel 1–99 % percentile-normalised, 3 channels) and
the detector's own transform leaves their intensities alone (mean 0, std 1); it resizes them so the
shorter side is ``min_size`` px (cells of DSB's H&E images are ~15 px across: 2× up to 512).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from phenoscope.train.l2sp import L2SP, l2sp_param_groups, with_penalty
from phenoscope.train.loop import TrainConfig

__all__ = ["MaskRCNNConfig", "MaskRCNNLoss", "MaskRCNNPhases", "ResNetTokens", "build_maskrcnn", "detection_target",
           "instance_dataset", "is_body", "predict_labels", "score_maskrcnn"]


@dataclass
class MaskRCNNConfig:
    """The detector and its phases (loop options per phase; ``steps`` of each as ``max_steps``)."""

    min_size: int = 512  # px, shorter image side inside the detector
    max_size: int = 1024
    detections: int = 300  # most instances per image
    score_threshold: float = 0.05  # COCO AP ranks detections by score: keep the low ones (torchvision default)
    l2sp_alpha: float = 0.5
    l2sp_strength: float = 1e-4
    ssl_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0.0,
                                                                       weight_decay=1e-4, weight_decay_end=1e-4,
                                                                       freeze_last_layer_epochs=0))
    source_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, batch_size=2, lr=1e-4, warmup_epochs=0.0,
                                                                          weight_decay=1e-4, weight_decay_end=1e-4,
                                                                          freeze_last_layer_epochs=0))
    finetune_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, batch_size=2, lr=1e-4, warmup_epochs=0.0,
                                                                            weight_decay=1e-4, weight_decay_end=1e-4,
                                                                            freeze_last_layer_epochs=0))


def build_maskrcnn(cfg: MaskRCNNConfig) -> nn.Module:
    """A random Mask R-CNN ResNet-50-FPN for one class (cell) plus background; nothing is downloaded."""
    from phenoscope.core.compat import import_torchvision

    import_torchvision()
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, min_size=cfg.min_size,
                                 max_size=cfg.max_size, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                                 box_detections_per_img=cfg.detections)


def is_body(name: str) -> bool:
    """Whether a Mask R-CNN parameter belongs to the backbone (the ResNet body), not the FPN or the heads."""
    return name.startswith("backbone.body.")


class ResNetTokens(nn.Module):
    """The ResNet body of a detector as a :class:`phenoscope.nn.Backbone`: its last feature map (stride 32)
    as patch tokens and their mean as ``cls``; the mask token exists for the protocol and is unused."""

    depth = 0
    patch_size = 32

    def __init__(self, body: nn.Module, in_chans: int = 3) -> None:
        super().__init__()
        self.body, self.in_chans = body, in_chans
        self.embed_dim = body.layer4[-1].conv3.out_channels
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim), requires_grad=False)

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if masks is not None:
            raise ValueError("ResNetTokens takes no patch masks (use a method without masked tokens, e.g. mocov3)")
        last = list(self.body(x).values())[-1]  # (B, D, H/32, W/32)
        patches = last.flatten(2).transpose(1, 2)
        return {"cls": patches.mean(dim=1), "patches": patches}


def detection_target(labels: np.ndarray) -> dict[str, torch.Tensor]:
    """Mask R-CNN target of a label image (H, W): ``boxes`` (N, 4) x0 y0 x1 y1 (exclusive ends, px),
    ``labels`` (N,) all 1, ``masks`` (N, H, W) uint8."""
    from scipy import ndimage

    found = [(i + 1, sl) for i, sl in enumerate(ndimage.find_objects(labels)) if sl is not None]
    boxes = np.array([(sx.start, sy.start, sx.stop, sy.stop) for _, (sy, sx) in found], np.float32).reshape(-1, 4)
    masks = np.stack([labels == i for i, _ in found]).astype(np.uint8) if found else np.zeros((0, *labels.shape), np.uint8)
    return {"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(found), dtype=torch.int64),
            "masks": torch.from_numpy(masks)}


class _Instances(Dataset):
    """(image, target) pairs with random flips; item ``i`` of epoch ``e`` is a pure function of (seed, e, i)."""

    def __init__(self, read: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> None:
        self.read, self.seed, self.epoch = list(read), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.read)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, labels = self.read[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        for axis in (1, 2):
            if rng.random() < 0.5:
                image, labels = np.flip(image, axis), np.flip(labels, axis - 1)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "target": detection_target(np.ascontiguousarray(labels))}


def instance_dataset(read: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> Dataset:
    """Training items ``{"image": (3, H, W), "target": detection_target}`` from (image, labels) pairs."""
    return _Instances(read, seed)


def collate_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Detection batches stay lists (images differ in size)."""
    return items


class MaskRCNNLoss(nn.Module):
    """Objective for the loop: the sum of Mask R-CNN's losses (RPN, box, mask), plus L2-SP of the body
    towards its weights when the objective is built (``l2sp_strength`` > 0); no weight decay on the body then."""

    def __init__(self, model: nn.Module, l2sp_strength: float = 0.0, l2sp_alpha: float = 0.5) -> None:
        super().__init__()
        self.model = model
        self.l2sp = (L2SP([(f"model.{n}", p) for n, p in model.named_parameters() if is_body(n)], l2sp_alpha, l2sp_strength)
                     if l2sp_strength else None)

    def param_groups(self) -> list[dict]:
        return l2sp_param_groups(self.named_parameters(), self.l2sp.names if self.l2sp else set())

    def forward(self, batch: list[dict[str, Any]], progress) -> dict[str, torch.Tensor]:
        self.model.train()
        losses = self.model([b["image"] for b in batch], [b["target"] for b in batch])
        out = {"loss": sum(losses.values()), **{k: v.detach() for k, v in losses.items()}}
        return with_penalty(out, self.l2sp)


@torch.no_grad()
def predict_labels(model: nn.Module, image: np.ndarray, score_threshold: float = 0.05) -> tuple[np.ndarray, list[float]]:
    """Label image (H, W) int32 and per-label scores of one (3, H, W) image: instances above
    ``score_threshold`` painted from the lowest score up (the most confident wins an overlap), masks at 0.5."""
    model.eval()
    out = model([torch.from_numpy(np.ascontiguousarray(image))])[0]
    keep = (out["scores"] >= score_threshold).nonzero().flatten().flip(0).tolist()  # ascending score
    painted = np.zeros(image.shape[1:], np.int32)
    for k, idx in enumerate(keep, start=1):
        painted[out["masks"][idx, 0].numpy() > 0.5] = k
    visible = np.unique(painted[painted > 0])  # an instance covered by more confident ones is gone
    lut = np.zeros(len(keep) + 1, np.int32)
    lut[visible] = np.arange(1, len(visible) + 1)
    return lut[painted], [float(out["scores"][keep[k - 1]]) for k in visible]


def score_maskrcnn(model: nn.Module, read: Sequence[tuple[np.ndarray, np.ndarray]], score_threshold: float = 0.05) -> dict[str, float]:
    """COCO AP_segm and AP_bbox (LIVECell limits; boxes of the predicted masks, scored by the detector) and
    AP@0.5 (cellpose definition) on (image, labels) pairs."""
    from phenoscope.eval.segmentation import average_precision, coco_ap

    preds = [predict_labels(model, image, score_threshold) for image, _ in read]
    truth = [lab for _, lab in read]
    masks, scores = [p[0] for p in preds], [p[1] for p in preds]
    segm, bbox = coco_ap(truth, masks, scores, "segm"), coco_ap(truth, masks, scores, "bbox")
    ap50 = float(average_precision(truth, masks, (0.5,))[0].mean())
    return {"ap50": ap50, "coco_ap_segm": segm["AP"], "coco_ap50_segm": segm["AP50"], "coco_ap_bbox": bbox["AP"],
            "coco_ap50_bbox": bbox["AP50"]}


@dataclass
class MaskRCNNPhases:
    """AMT² + fine-tuning of a Mask R-CNN: ``run`` trains each phase into ``out/<phase>/`` (kept if done)."""

    cfg: MaskRCNNConfig
    out: Path

    def ssl(self, model: nn.Module, pool: Sequence[np.ndarray], seed: int = 0) -> None:
        """MoCo (v3 with a v2 key queue) of the ResNet body on unlabelled (3, H, W) images, in place."""
        from dataclasses import replace

        from phenoscope.ssl.augment import AugmentConfig
        from phenoscope.ssl.data import MultiCropCollate, MultiCropDataset
        from phenoscope.ssl.moco import MoCo, MoCoConfig
        from phenoscope.train.loop import train

        aug = AugmentConfig(global_size=224, n_local=0, normalize="dataset", channel_mean=[0.0] * 3, channel_std=[1.0] * 3)
        objective = MoCo(ResNetTokens(model.backbone.body), MoCoConfig(proj_hidden_dim=1024, pred_hidden_dim=1024, queue_size=256))
        train(objective, MultiCropDataset(list(pool), aug, seed), replace(self.cfg.ssl_train, seed=seed), self.out / "ssl",
              resume=True, collate_fn=MultiCropCollate(aug, 32))

    def supervised(self, model: nn.Module, read: Sequence[tuple[np.ndarray, np.ndarray]], name: str, l2sp: bool,
                   loop: TrainConfig) -> dict[str, Any]:
        """Train the whole detector on (image, labels) pairs, the body under L2-SP towards its current weights if ``l2sp``."""
        from phenoscope.train.loop import train

        objective = MaskRCNNLoss(model, self.cfg.l2sp_strength if l2sp else 0.0, self.cfg.l2sp_alpha)
        return train(objective, instance_dataset(read, loop.seed), loop, self.out / name, resume=True, collate_fn=collate_list)

    def run(self, pool: Sequence[np.ndarray], source: Sequence[tuple[np.ndarray, np.ndarray]],
            labelled: Sequence[tuple[np.ndarray, np.ndarray]], plus: bool = False, rounds: int = 1) -> nn.Module:
        """CUPre (``plus``: CUPre++): ``rounds`` × (SSL on ``pool``, source training under L2-SP), then fine-tuning."""
        from phenoscope.fewshot.amt2 import amt2_schedule

        torch.manual_seed(0)
        model = build_maskrcnn(self.cfg)
        for phase in amt2_schedule(rounds, plus):
            if phase.kind == "ssl":
                self.ssl(model, pool)
            elif phase.kind == "source":
                self.supervised(model, source, phase.name, phase.l2sp, self.cfg.source_train)
            else:
                self.supervised(model, labelled, "finetune", phase.l2sp, self.cfg.finetune_train)
        return model
