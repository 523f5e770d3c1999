"""Classical baseline: Otsu threshold + distance-transform watershed (the floor for accuracy claims)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import remove_small_objects
from skimage.segmentation import relabel_sequential, watershed

from phenoscope.core.axes import channels_last
from phenoscope.core.normalize import normalize_percentile


def to_gray(image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """(H, W[, C]) image → (H, W) float32 in [0, ~1]: per-channel percentile normalisation, then mean."""
    image = np.asarray(image)
    if image.ndim == 2 and channel_axis is None:
        return normalize_percentile(image).astype(np.float32)
    return normalize_percentile(channels_last(image, channel_axis), channel_axis=-1).mean(axis=-1).astype(np.float32)


def segment_classic(
    image: np.ndarray,
    channel_axis: int | None = None,
    invert: bool | None = None,
    min_size: int = 15,
    min_distance: int = 4,
    smooth_sigma: float = 1.0,
) -> np.ndarray:
    """Segment nuclei/cells with Otsu + distance-transform watershed.

    Args:
        image: (H, W) or (H, W, C) / (C, H, W) with ``channel_axis``.
        invert: True for dark objects on a bright background (bright-field, H&E). ``None``
            decides automatically: the image is inverted when most pixels are above the Otsu
            threshold (a bright background).
        min_size: objects smaller than this many pixels are removed.
        min_distance: minimum distance (px) between watershed seeds.
        smooth_sigma: Gaussian smoothing (px) before thresholding.
    Returns:
        (H, W) uint32 label image, 0 = background, labels 1..N.
    """
    gray = gaussian(to_gray(image, channel_axis), sigma=smooth_sigma, preserve_range=True)
    if np.ptp(gray) == 0:
        return np.zeros(gray.shape, np.uint32)
    thresh = threshold_otsu(gray)
    fg = gray > thresh
    if invert is None:
        invert = fg.mean() > 0.5
    if invert:
        fg = ~fg
    fg = ndi.binary_fill_holes(remove_small_objects(fg, max_size=max(min_size - 1, 0)))
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=ndi.label(fg)[0], exclude_border=False)
    markers = np.zeros(gray.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    labels = remove_small_objects(labels, max_size=max(min_size - 1, 0))
    return relabel_sequential(labels.astype(np.uint32))[0]
