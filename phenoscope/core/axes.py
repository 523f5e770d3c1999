"""The one channel-axis rule of phenoscope.

A 2D array is one channel (YX). A 3D array has its channel axis given, or guessed as cellpose guesses:
the first axis if it is shorter than the last (CYX), else the last (YXC). Every reader of
multi-channel images (segmentation, classic baseline, SSL data, embedding) goes through here.
"""

from __future__ import annotations

import numpy as np

# ``layout`` strings of the SSL / embedding configs → channel axis (None: guess)
LAYOUTS: dict[str, int | None] = {"auto": None, "CYX": 0, "YXC": -1}


def guess_channel_axis(shape: tuple[int, ...]) -> int | None:
    """None for a 2D (YX) shape; for 3D, 0 if ``shape[0] < shape[-1]`` (CYX) else 2 (YXC)."""
    if len(shape) == 2:
        return None
    if len(shape) != 3:
        raise ValueError(f"expected a 2D image (YX, YXC or CYX), got shape {tuple(shape)}")
    return 0 if shape[0] < shape[-1] else 2


def channels_last(image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """(H, W, C) view of a YX / YXC / CYX image (YX gets C = 1); ``channel_axis`` None guesses it."""
    image = np.asarray(image)
    if image.ndim == 2:
        if channel_axis is not None:
            raise ValueError(f"channel_axis={channel_axis} given for a 2D (YX) image of shape {image.shape}")
        return image[..., None]
    if channel_axis is None:
        channel_axis = guess_channel_axis(image.shape)
    elif image.ndim != 3:
        raise ValueError(f"expected a 2D image (YX, YXC or CYX), got shape {image.shape}")
    if not -3 <= channel_axis < 3:
        raise ValueError(f"channel_axis={channel_axis} is out of range for an image of shape {image.shape}")
    return np.moveaxis(image, channel_axis, -1)


def channels_first(image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """(C, H, W) view of a YX / YXC / CYX image (see :func:`channels_last`)."""
    return np.moveaxis(channels_last(image, channel_axis), -1, 0)


def layout_axis(layout: str) -> int | None:
    """Channel axis of a ``layout`` string (``auto``, ``CYX``, ``YXC``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    return LAYOUTS[layout]
