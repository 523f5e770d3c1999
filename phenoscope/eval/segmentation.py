"""Instance-segmentation metrics.

* ``average_precision``: cellpose's definition, AP = TP / (TP + FP + FN) after Hungarian matching at
  each IoU threshold (same numbers as ``cellpose.metrics.average_precision``), plus the error rate
  (FP + FN) / (TP + FN).
* ``coco_ap``: COCO AP_bbox / AP_segm through faster-coco-eval with the LIVECell settings
  (maxDets 100/500/2000, areas small < 18², medium 18²–31², large > 31², headline at 2000).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from phenoscope.segment.flows import check_labels

LIVECELL_MAX_DETS = (100, 500, 2000)
LIVECELL_AREAS = {"all": (0, 1e10), "small": (0, 18**2), "medium": (18**2, 31**2), "large": (31**2, 1e10)}


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU between every true label (rows 0..max) and predicted label (cols 0..max), background included."""
    if true.shape != pred.shape:
        raise ValueError(f"true and predicted masks differ in shape: {true.shape} vs {pred.shape}")
    nt, npred = int(true.max()) + 1, int(pred.max()) + 1
    overlap = np.bincount(true.ravel() * npred + pred.ravel(), minlength=nt * npred).reshape(nt, npred)
    union = overlap.sum(axis=0, keepdims=True) + overlap.sum(axis=1, keepdims=True) - overlap
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = overlap / union
    iou[np.isnan(iou)] = 0.0
    return iou


def _true_positives(iou: np.ndarray, threshold: float) -> int:
    """Matches with IoU ≥ threshold under cellpose's Hungarian cost (prefers ≥ threshold, then IoU)."""
    n_min = min(iou.shape)
    costs = -(iou >= threshold).astype(float) - iou / (2 * n_min)
    ti, pi = linear_sum_assignment(costs)
    return int((iou[ti, pi] >= threshold).sum())


def average_precision(
    true_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray], thresholds: Sequence[float] = (0.5, 0.75, 0.9)
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-image AP, TP, FP, FN at each IoU threshold (arrays of shape (n_images, n_thresholds)).

    Each argument is a list of label images (0 = background). Labels are counted as the distinct
    non-zero values (as cellpose), so non-contiguous labels are fine.
    """
    if isinstance(true_masks, np.ndarray) or isinstance(pred_masks, np.ndarray):
        raise ValueError("pass lists of label images (one per image), not a single array")
    if len(true_masks) != len(pred_masks):
        raise ValueError(f"got {len(true_masks)} true and {len(pred_masks)} predicted label images")
    thresholds = list(np.atleast_1d(thresholds))
    shape = (len(true_masks), len(thresholds))
    ap, tp, fp, fn = (np.zeros(shape, np.float32) for _ in range(4))
    for n, (t, p) in enumerate(zip(true_masks, pred_masks)):
        t, p = check_labels(t, "true mask"), check_labels(p, "predicted mask")
        n_true, n_pred = len(np.unique(t)) - 1, len(np.unique(p)) - 1
        if n_pred > 0:
            iou = iou_matrix(t, p)[1:, 1:]
            tp[n] = [_true_positives(iou, th) for th in thresholds]
        fp[n] = n_pred - tp[n]
        fn[n] = n_true - tp[n]
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[n] = tp[n] / (tp[n] + fp[n] + fn[n])
    return ap, tp, fp, fn


def error_rate(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """(FP + FN) / (TP + FN), elementwise (NaN where an image has no true objects)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (fp + fn) / (tp + fn)


def _coco_dicts(true_masks, pred_masks, scores):
    from faster_coco_eval.core import mask as mask_utils

    images, gts, dts = [], [], []
    for i, (t, p) in enumerate(zip(true_masks, pred_masks)):
        t, p = check_labels(t, "true mask"), check_labels(p, "predicted mask")
        if t.ndim != 2:
            raise ValueError("coco_ap takes 2D label images")
        images.append({"id": i, "height": int(t.shape[0]), "width": int(t.shape[1])})
        for lab_img, out, sc in ((t, gts, None), (p, dts, None if scores is None else scores[i])):
            for j, lab in enumerate(l for l in np.unique(lab_img) if l):
                rle = mask_utils.encode(np.asfortranarray(lab_img == lab, dtype=np.uint8))
                rle["counts"] = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
                ann = {
                    "id": len(out) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
                if out is dts:
                    ann["score"] = 1.0 if sc is None else float(sc[j])
                out.append(ann)
    return images, gts, dts


def coco_ap(
    true_masks: Sequence[np.ndarray],
    pred_masks: Sequence[np.ndarray],
    scores: Sequence[Sequence[float]] | None = None,
    iou_type: str = "segm",
) -> dict[str, float]:
    """COCO-style AP/AR with LIVECell settings via faster-coco-eval.

    Args:
        scores: optional per-image confidence for each predicted label (in increasing label
            order); all 1.0 if omitted.
        iou_type: "segm" or "bbox".
    Returns:
        dict with AP, AP50, AP75, AP_small, AP_medium, AP_large (maxDets 2000) and AR@100/500/2000.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    images, gts, dts = _coco_dicts(true_masks, pred_masks, scores)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": 1, "name": "cell"}]}
    gt.createIndex()
    dt = gt.loadRes(dts) if dts else COCO()
    ev = COCOeval_faster(gt, dt, iouType=iou_type, print_function=lambda *a, **k: None)
    ev.params.maxDets = list(LIVECELL_MAX_DETS)
    ev.params.areaRng = [list(v) for v in LIVECELL_AREAS.values()]
    ev.params.areaRngLbl = list(LIVECELL_AREAS)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    s = ev.stats
    names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR@100", "AR@500", "AR@2000"]
    return {k: float(v) for k, v in zip(names, s)}
