"""Image preparation for the segmentation network, shared by inference and training.

(H, W, C ≤ in_chans) via the one channel-axis rule (:mod:`phenoscope.core.axes`), a gray image stored
as identical planes merged to one channel when the network was trained so, per-channel 1–99 %
percentile normalisation, and the bilinear resize that brings cells to the network's diameter.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from phenoscope.core.axes import channels_last, guess_channel_axis
from phenoscope.core.normalize import normalize_percentile

MIN_SIDE = 16  # px; smaller images cannot hold a cell of min_size at the network's scale
MAX_GUESSED_CHANNELS = 5  # more planes on a guessed channel axis are a Z-stack or a time series, not channels


def to_yxc(image: np.ndarray, channel_axis: int | None = None, max_channels: int = 3) -> np.ndarray:
    """View an image as (H, W, C) with C ≤ ``max_channels`` (the first channels are kept).

    YX images get one channel; without ``channel_axis`` the channel axis of a 3D array is guessed
    (:func:`phenoscope.core.axes.guess_channel_axis`), and more than ``MAX_GUESSED_CHANNELS`` planes
    there are refused as a stack (Z or time) rather than segmented as one 2D image.
    """
    if channel_axis is None and np.ndim(image) == 3:
        n = np.shape(image)[guess_channel_axis(np.shape(image))]
        if n > MAX_GUESSED_CHANNELS:
            raise ValueError(
                f"image of shape {np.shape(image)} looks like a stack of {n} planes (Z or time), not channels; "
                "2D segmentation takes YX, YXC or CYX images (give the channel axis if these are channels)"
            )
    image = channels_last(image, channel_axis)
    if image.dtype.kind not in "biuf":
        raise ValueError(f"unsupported image dtype {image.dtype}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(
            f"image is {image.shape[0]}×{image.shape[1]} px (channel_axis={channel_axis}, shape {image.shape}); "
            f"need at least {MIN_SIDE}×{MIN_SIDE} — is the channel axis right?"
        )
    return image[..., :max_channels]


def merge_identical_channels(image: np.ndarray) -> np.ndarray:
    """(H, W, C) → (H, W, 1) when every channel equals the first (a gray image saved as RGB), else as is."""
    if image.shape[-1] > 1 and all(np.array_equal(image[..., 0], image[..., c]) for c in range(1, image.shape[-1])):
        return image[..., :1]
    return image


def network_input(image: np.ndarray, channel_axis: int | None, in_chans: int, merge_identical: bool) -> np.ndarray:
    """(C ≤ in_chans, H, W) float32 as the network sees an image: its first ``in_chans`` channels
    (a gray image stored as identical planes merged to one if ``merge_identical``), each 1–99 %
    percentile-normalised. Raises ``ValueError`` on bad axes or NaN/inf."""
    x = to_yxc(image, channel_axis, max_channels=np.size(image))
    dropped = x[..., in_chans:]
    if dropped.size and any(np.ptp(dropped[..., c]) > 0 for c in range(dropped.shape[-1])):  # not just alpha
        warnings.warn(f"image has {x.shape[-1]} channels; the model uses the first {in_chans}", UserWarning, stacklevel=2)
    x = x[..., :in_chans]
    if merge_identical:
        x = merge_identical_channels(x)
    return np.moveaxis(normalize_percentile(x, channel_axis=-1), -1, 0)


def padded_network_input(image: np.ndarray, channel_axis: int | None, in_chans: int, merge_identical: bool) -> np.ndarray:
    """:func:`network_input` zero-padded to exactly (in_chans, H, W): the fixed-size array training batches stack."""
    x = network_input(image, channel_axis, in_chans, merge_identical)
    out = np.zeros((in_chans, *x.shape[1:]), np.float32)
    out[: x.shape[0]] = x
    return out


def resize_chw(x: np.ndarray, ly: int, lx: int) -> np.ndarray:
    """Bilinear resize of a (C, H, W) float32 array (half-pixel centres, no antialias: cv2 INTER_LINEAR)."""
    if x.shape[-2:] == (ly, lx):
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    return F.interpolate(t, size=(ly, lx), mode="bilinear", align_corners=False)[0].numpy()
