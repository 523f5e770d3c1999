"""napari writers for Labels layers: a label TIFF and an ImageJ/Fiji ROI zip (phenoscope segment's writers)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _labels_2d(data: Any, path: str) -> np.ndarray:
    masks = np.asarray(data)
    if masks.ndim != 2 or masks.dtype.kind not in "biu":
        raise ValueError(f"{path}: expected a 2D integer label image, got shape {masks.shape} ({masks.dtype})")
    return masks


def write_labels_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as a compressed label TIFF (uint16, or uint32 above 65535 labels)."""
    from phenoscope.segment.outputs import write_masks

    write_masks(path, _labels_2d(data, path))
    return [path]


def write_labels_rois(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as an ImageJ/Fiji ROI zip, one polygon per label."""
    from phenoscope.segment.outputs import write_imagej_rois

    write_imagej_rois(path, _labels_2d(data, path))
    return [path]
