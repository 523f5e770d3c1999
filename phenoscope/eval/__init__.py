"""Evaluation: instance-segmentation metrics (cellpose AP, COCO AP) and frozen-feature probes
(kNN, linear and MLP probes, low-shot curves).

Retrieval metrics of profiles (mAP, NSC) live in :mod:`phenoscope.profiling.metrics`.
"""

from phenoscope.eval.probes import (
    LOW_SHOT_FRACTIONS,
    PROBE_C,
    classification_metrics,
    knn_scores,
    linear_probe_scores,
    low_shot_curve,
    mlp_scores,
    select_c,
    stratified_fraction,
)
from phenoscope.eval.segmentation import average_precision, coco_ap, error_rate, iou_matrix

__all__ = [
    "LOW_SHOT_FRACTIONS",
    "PROBE_C",
    "average_precision",
    "classification_metrics",
    "coco_ap",
    "error_rate",
    "iou_matrix",
    "knn_scores",
    "linear_probe_scores",
    "low_shot_curve",
    "mlp_scores",
    "select_c",
    "stratified_fraction",
]
