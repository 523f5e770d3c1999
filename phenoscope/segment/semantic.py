"""Semantic (panoptic) classes for Cellpose-SAM networks: class maps, their loss, the per-mask vote, metrics.

Channel layout. A network with ``NetConfig.classes`` = K > 0 outputs ``nout`` + K + 1 maps:
(dY, dX, cellprob, background, class 1, …, class K). The K + 1 class logit maps are read out from the
neck features by their own 1×1 conv + pixel shuffle (``CellposeSAMNet.classify``), so the flow/cellprob
read-out, the full-resolution refinement (which leaves the class maps alone), tiled inference, TTA, 3D
and the size head work as before; ``nout`` stays 3. :func:`with_classes` adds the class read-out to a
(trained) network, initialised as in the Cellpose-SAM paper from the cellprob map's read-out: ×−0.5 for
the background map, ×0.5 for each class map, so at first background wins where the cellprob logit is
negative and the (tied) classes where it is positive.

Targets. The class target of an image is a per-pixel class image (H, W) int64: 0 = background, 1..K =
the class of the object under the pixel, one class per object. It comes from a second label image of
classes (:func:`target_from_class_image`: each object takes its majority class there) or from a
per-object table (:func:`target_from_table`). Training adds :func:`class_loss` — cross-entropy over the
K + 1 maps weighted by inverse class frequency in the batch (:func:`class_weights`) — to the cellpose
loss (:class:`phenoscope.segment.training.CellposeLoss`, for batches with ``classes``).

Inference. :func:`vote_classes`: each mask takes the majority over its pixels of the per-pixel argmax of
the class maps; masks whose majority is background are dropped. :func:`segment_classes` runs a model on
an image and votes. Metrics: :func:`class_metrics` (AP and error rate per class, and their means).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from phenoscope.eval.segmentation import average_precision, error_rate
from phenoscope.segment.flows import check_labels
from phenoscope.segment.net import CellposeSAMNet, grown
from phenoscope.segment.outputs import classes_per_label

if TYPE_CHECKING:
    from phenoscope.segment.inference import CellposeSAM
    from phenoscope.segment.options import MaskOptions

# the paper's initialisation of the class read-out, as multiples of the cellprob read-out
BACKGROUND_INIT, CLASS_INIT = -0.5, 0.5


def with_classes(net: CellposeSAMNet, k: int) -> CellposeSAMNet:
    """A copy of ``net`` with K + 1 class maps (background, class 1..k) whose read-out weights and bias are
    the cellprob map's ×−0.5 (background) and ×0.5 (each class); its flow and cellprob outputs are ``net``'s.

    The class maps are initialised from the patch read-out (``out``), not from a refinement path's output.
    ``net`` must not have class maps yet."""
    if k < 1:
        raise ValueError(f"the number of classes must be ≥ 1, got {k}")
    if net.cfg.classes:
        raise ValueError(f"the network already has {net.cfg.classes} classes")
    out = grown(net, classes=k)
    p2 = net.cfg.patch**2
    cellprob = slice(2 * p2, 3 * p2)  # pixel-shuffle rows of output channel 2
    scale = torch.tensor([BACKGROUND_INIT] + [CLASS_INIT] * k).repeat_interleave(p2)
    with torch.no_grad():
        out.classify.weight.copy_(out.out.weight[cellprob].repeat(k + 1, 1, 1, 1) * scale[:, None, None, None])
        out.classify.bias.copy_(out.out.bias[cellprob].repeat(k + 1) * scale)
    return out


def class_weights(target: torch.Tensor, n_maps: int) -> torch.Tensor:
    """Inverse-frequency weights (n_maps,) of the classes 0..n_maps−1 in an integer target of any shape:
    w_c = N / (P · n_c) for the P classes present (n_c pixels of N), 0 for absent classes, so that
    Σ_c n_c · w_c = N (the mean weight per pixel is 1) and each present class weighs the same in total.
    Pass one batch's targets (as :func:`class_loss` does) or a whole training set's."""
    counts = torch.bincount(target.reshape(-1), minlength=n_maps).to(torch.float32)
    present = counts > 0
    return torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), 0.0)


def class_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted cross-entropy of class logits (B, K+1, H, W) against a long target (B, H, W) in 0..K.

    ``weight`` (K+1,): per-class weights; default :func:`class_weights` of this batch's ``target``, with
    which the loss is the mean over the classes present of each class's mean pixel loss
    (PyTorch's weighted mean: Σ w_{t_i}·ℓ_i / Σ w_{t_i})."""
    weight = class_weights(target, logits.shape[1]) if weight is None else weight
    return F.cross_entropy(logits, target, weight=weight.to(logits))


def majority_class(labels: np.ndarray, pixel_classes: np.ndarray) -> np.ndarray:
    """(labels.max() + 1,) int64: entry ℓ is the most frequent value of ``pixel_classes`` (ints ≥ 0, the
    shape of ``labels``) over label ℓ's pixels; ties go to the smaller class; entry 0 (background) and
    labels absent from the image are 0."""
    labels, pixel_classes = check_labels(labels, "labels"), check_labels(pixel_classes, "class image")
    if labels.shape != pixel_classes.shape:
        raise ValueError(f"labels and class image differ in shape: {labels.shape} vs {pixel_classes.shape}")
    n = int(pixel_classes.max(initial=0)) + 1
    counts = np.bincount((labels * n + pixel_classes).ravel(), minlength=(int(labels.max(initial=0)) + 1) * n)
    majority = counts.reshape(-1, n).argmax(axis=1)
    majority[0] = 0
    return majority


def target_from_class_image(labels: np.ndarray, class_image: np.ndarray) -> np.ndarray:
    """Per-pixel class target (H, W) int64 from an instance label image and a class image of the same
    shape (class per pixel, 0 = background): each object gets its majority class in ``class_image``
    (:func:`majority_class`) on all its pixels; pixels outside objects are 0."""
    return majority_class(labels, class_image)[check_labels(labels, "labels")]


def target_from_table(labels: np.ndarray, table: Mapping[int, int]) -> np.ndarray:
    """Per-pixel class target (H, W) int64 from an instance label image and a per-object table
    (object id → class ≥ 0; 0 marks an object as background). Every object of ``labels`` must be in the
    table (``ValueError`` naming the missing ids); ids not in ``labels`` are ignored."""
    labels = check_labels(labels, "labels")
    ids = np.unique(labels[labels > 0])
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
    lut[ids] = classes_per_label(table, ids)
    if lut.min(initial=0) < 0:
        raise ValueError(f"classes must be ≥ 0 (0 = background), got {int(lut.min())}")
    return lut[labels]


def class_image(masks: np.ndarray, classes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-pixel class image (H, W) int64 of masks labelled 1..n and their classes (n,) (as
    :func:`vote_classes` gives them): pixel class = classes[label − 1], 0 on background."""
    return np.concatenate([[0], np.asarray(classes, np.int64)])[check_labels(masks, "masks")]


def vote_classes(masks: np.ndarray, class_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class of each mask from class maps (K+1, H, W) (logits or probabilities; map 0 = background):
    the per-pixel argmax, then the majority over the mask's pixels (ties to the smaller class, so a tie
    with background drops the mask). Masks whose majority is background are dropped.

    Returns (masks (H, W) int32 relabelled 1..n in the order of their old labels, classes (n,) int64 in 1..K).
    """
    if class_maps.ndim != 3 or class_maps.shape[1:] != masks.shape:
        raise ValueError(f"class maps must be (K+1, {', '.join(map(str, masks.shape))}), got {class_maps.shape}")
    majority = majority_class(masks, class_maps.argmax(axis=0))
    kept = np.flatnonzero(majority)
    relabel = np.zeros(len(majority), np.int32)
    relabel[kept] = np.arange(1, len(kept) + 1)
    return relabel[check_labels(masks, "masks")], majority[kept]


def segment_classes(
    model: CellposeSAM, image: np.ndarray, channel_axis: int | None = None, diameter: float | None = None,
    options: MaskOptions | None = None, tile_overlap: float = 0.1, batch_size: int = 8, tta: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(masks (H, W) labelled 1..n, classes (n,)) of an image from a model with class maps: masks as
    :meth:`CellposeSAM.predict_masks` makes them (``diameter`` in px; None: native size), then
    :func:`vote_classes` on the class maps."""
    if not model.cfg.classes:
        raise ValueError("the network has no class maps (NetConfig.classes = 0); add them with with_classes")
    y = model.predict_maps(image, channel_axis, diameter, tile_overlap, batch_size, tta)
    return vote_classes(model.masks(y[:2], y[2], diameter, options), y[model.cfg.nout:])


@dataclass(frozen=True)
class ClassMetrics:
    """Per-class instance metrics (arrays over classes 1..K) and their means over the classes present."""

    classes: np.ndarray  # (K,) the class ids 1..K
    ap: np.ndarray  # (K,) TP / (TP + FP + FN) at the IoU threshold, counts summed over images (NaN: no object at all)
    error: np.ndarray  # (K,) (FP + FN) / (TP + FN) (inf or NaN where the truth has no object of the class)
    n_true: np.ndarray  # (K,) true objects of each class
    mean_ap: float  # mean of ``ap`` over the classes with true objects (NaN if none)
    mean_error: float  # mean of ``error`` over the same classes


def class_metrics(
    true_masks: Sequence[np.ndarray], true_classes: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray],
    pred_classes: Sequence[np.ndarray], n_classes: int, threshold: float = 0.5,
) -> ClassMetrics:
    """AP and error rate of each class 1..``n_classes`` over a list of images, with truth and prediction
    both restricted to the class (:func:`phenoscope.eval.segmentation.average_precision` on masks whose
    per-pixel class image is c), and their means over the classes present in the truth.

    Each ``*_classes`` entry is the per-pixel class image (H, W) of the matching label image, constant
    per object (:func:`target_from_class_image`, :func:`target_from_table`, :func:`class_image`)."""
    if not len(true_masks) == len(true_classes) == len(pred_masks) == len(pred_classes):
        raise ValueError("pass one true/predicted label image and class image per image")
    counts = np.zeros((n_classes, 3))  # TP, FP, FN per class
    for c in range(1, n_classes + 1):
        true = [np.where(np.asarray(k) == c, m, 0) for m, k in zip(true_masks, true_classes)]
        pred = [np.where(np.asarray(k) == c, m, 0) for m, k in zip(pred_masks, pred_classes)]
        _, tp, fp, fn = average_precision(true, pred, [threshold])
        counts[c - 1] = tp.sum(), fp.sum(), fn.sum()
    tp, fp, fn = counts.T
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = tp / (tp + fp + fn)
    err = error_rate(tp, fp, fn)
    n_true = (tp + fn).astype(np.int64)
    present = n_true > 0
    mean_ap, mean_err = (float(v[present].mean()) if present.any() else float("nan") for v in (ap, err))
    return ClassMetrics(np.arange(1, n_classes + 1), ap, err, n_true, mean_ap, mean_err)
