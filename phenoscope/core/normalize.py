"""Per-channel percentile normalisation (cellpose's ``normalize99`` semantics, no global state)."""

from __future__ import annotations

import numpy as np

# cellpose: arrays above 224**3 elements estimate percentiles on a strided subsample.
_SUBSAMPLE_ABOVE = 224**3


def sample_steps(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-axis strides of the sample whose percentiles stand for an array of ``shape`` (all 1 up to 224³
    elements; cellpose's rule above: every (n // 224)-th pixel, every (n // 50)-th plane of a volume)."""
    if int(np.prod(shape)) <= _SUBSAMPLE_ABOVE:
        return (1,) * len(shape)
    step = [max(1, n // 224) for n in shape]
    if len(shape) == 3:
        step[0] = max(1, shape[0] // 50)
    return tuple(step)


def _percentiles(x: np.ndarray, lower: float, upper: float) -> tuple[float, float]:
    x = x[tuple(slice(0, n, s) for n, s in zip(x.shape, sample_steps(x.shape)))]
    lo, hi = np.percentile(x, [lower, upper])
    return float(lo), float(hi)


def normalize_percentile(
    image: np.ndarray,
    channel_axis: int | None = None,
    lower: float = 1.0,
    upper: float = 99.0,
) -> np.ndarray:
    """Map each channel's ``lower`` percentile to 0 and ``upper`` percentile to 1.

    Args:
        image: array of any shape; ``channel_axis`` (if given) indexes channels.
        lower, upper: percentiles in [0, 100], ``lower < upper``.
    Returns:
        float32 array of the same shape. A constant channel, or one whose percentile range
        is ≤ 1e-3, becomes all zeros (cellpose's guards). Percentiles of arrays larger than
        224³ elements are estimated on a strided subsample, as cellpose does.
    """
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got ({lower}, {upper})")
    x = np.array(image, dtype=np.float32, copy=True)
    if not np.isfinite(x).all():
        raise ValueError("image contains NaN or inf values")
    if channel_axis is None:
        views = [x]
    else:
        x = np.moveaxis(x, channel_axis, 0)
        views = list(x)
    for v in views:
        lo, hi = _percentiles(v, lower, upper)
        if np.ptp(v) == 0 or hi - lo <= 1e-3:
            v[...] = 0
        else:
            v -= lo
            v /= hi - lo
    return x if channel_axis is None else np.moveaxis(x, 0, channel_axis)
