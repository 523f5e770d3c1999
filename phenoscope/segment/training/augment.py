"""Training augmentations of the Cellpose-SAM paper, as small functions over arrays.

A training sample is a normalised image (C=3, H, W) float32, its unit flows (2, H, W) = (dY, dX)
and its foreground mask (H, W). :func:`augment_sample` turns one into a ``tile``² training tile
(the network's input size):

1. one affine warp: random rotation, flip, log-uniform resize (cell diameter → ``diam_mean`` × f,
   f ∈ ``scale_range``) and a random crop; flow vectors are rotated / reflected with the image;
2. on ``p_degrade`` of the tiles one degradation (Poisson noise, Gaussian blur, downsampling, or
   anisotropic blur with downsampling), then per-channel renormalisation;
3. grayscale (all channels ← their mean), contrast inversion, dropping the third channel,
   channel permutation, per-channel brightness and contrast jitter.

Every random draw comes from the ``numpy.random.Generator`` passed in, so a sample is a pure
function of (data, seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from phenoscope.core.normalize import normalize_percentile

DEGRADATIONS = ("poisson", "blur", "downsample", "aniso_blur")


@dataclass
class SegAugmentConfig:
    """Augmentation options (probabilities in [0, 1]; sizes in pixels)."""

    diam_mean: float = 30.0  # px; cells are resized to diam_mean × f
    scale_range: tuple[float, float] = (0.25, 4.0)  # f, log-uniform (paper: 0.25–4; fine-tuning e.g. 0.75–1.25)
    rotate: bool = True  # any angle, plus a random flip
    p_gray: float = 0.1
    p_invert: float = 0.25
    p_drop_third: float = 0.1
    permute_channels: bool = True
    contrast: float = 0.25  # per-channel gain, log-uniform in [1/(1+c), 1+c]
    brightness: float = 0.1  # per-channel offset, uniform in [−b, b]
    p_degrade: float = 0.5
    poisson_peak: tuple[float, float] = (5.0, 200.0)  # photons at intensity 1, log-uniform
    blur_sigma: tuple[float, float] = (0.5, 3.0)  # px
    downsample: tuple[float, float] = (2.0, 6.0)  # factor


def random_affine(
    shape: tuple[int, int], tile: int, scale: float, rng: np.random.Generator, rotate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random crop transform ``input = A @ output + offset`` (coordinates as (y, x)).

    ``A = M / scale`` with ``M`` orthogonal (rotation, possibly with a flip of x). The crop centre is
    uniform over the image. Returns (A, offset, M); flow vectors map as ``v_out = M.T @ v_in``.
    """
    theta = rng.uniform(0, 2 * np.pi) if rotate else 0.0
    flip = rotate and rng.random() < 0.5
    c, s = np.cos(theta), np.sin(theta)
    m = np.array([[c, -s], [s, c]])
    if flip:
        m = m @ np.diag([1.0, -1.0])
    a = m / scale
    centre_in = np.array([rng.uniform(0, shape[0] - 1), rng.uniform(0, shape[1] - 1)])
    centre_out = np.array([(tile - 1) / 2, (tile - 1) / 2])
    return a, centre_in - a @ centre_out, m


def warp(array: np.ndarray, a: np.ndarray, offset: np.ndarray, tile: int, order: int) -> np.ndarray:
    """Resample (…, H, W) ``array`` at ``A @ out + offset`` onto a (…, tile, tile) grid (zeros outside).

    All-zero planes (the empty channels of gray images) are not resampled: they stay zero.
    """
    if array.ndim == 2:
        if not array.any():
            return np.zeros((tile, tile), array.dtype)
        return ndi.affine_transform(array, a, offset, output_shape=(tile, tile), order=order, mode="constant", prefilter=False)
    return np.stack([warp(x, a, offset, tile, order) for x in array])


def rotate_flows(flows: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(2, H, W) (dY, dX) vectors expressed in input axes → output axes of a warp with orthogonal ``m``."""
    return np.einsum("ji,jhw->ihw", m, flows).astype(np.float32)


def poisson_noise(image: np.ndarray, rng: np.random.Generator, peak: float) -> np.ndarray:
    """Shot noise with ``peak`` photons at intensity 1 (negative values clipped first)."""
    return (rng.poisson(np.clip(image, 0, None) * peak) / peak).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float | tuple[float, float]) -> np.ndarray:
    """Blur each channel of (C, H, W) with ``sigma`` px (scalar, or (σy, σx) for anisotropic)."""
    s = (0, *np.broadcast_to(sigma, 2))
    return ndi.gaussian_filter(image, s).astype(np.float32)


def downsample(image: np.ndarray, factor: float | tuple[float, float]) -> np.ndarray:
    """Shrink (C, H, W) by ``factor`` (area averaging) and scale back up (bilinear): lost resolution."""
    fy, fx = np.broadcast_to(factor, 2)
    h, w = image.shape[1:]
    small = ndi.zoom(ndi.uniform_filter(image, (1, max(int(round(fy)), 1), max(int(round(fx)), 1))),
                     (1, 1 / fy, 1 / fx), order=1, grid_mode=True, mode="nearest")
    return ndi.zoom(small, (1, h / small.shape[1], w / small.shape[2]), order=1, grid_mode=True, mode="nearest").astype(np.float32)


def degrade(image: np.ndarray, rng: np.random.Generator, cfg: SegAugmentConfig, kind: str | None = None) -> np.ndarray:
    """One degradation of (C, H, W) (``kind``, or a random one of :data:`DEGRADATIONS`), then renormalisation."""
    kind = kind or DEGRADATIONS[rng.integers(len(DEGRADATIONS))]
    if kind == "poisson":
        out = poisson_noise(image, rng, log_uniform(rng, cfg.poisson_peak))
    elif kind == "blur":
        out = gaussian_blur(image, rng.uniform(*cfg.blur_sigma))
    elif kind == "downsample":
        out = downsample(image, rng.uniform(*cfg.downsample))
    else:  # anisotropic: blur and downsample along one axis
        axis = rng.integers(2)
        f = rng.uniform(*cfg.downsample)
        sigma, factor = [0.0, 0.0], [1.0, 1.0]
        sigma[axis], factor[axis] = f / 2, f
        out = downsample(gaussian_blur(image, tuple(sigma)), tuple(factor))
    return renormalize(out, image)


def renormalize(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Percentile-normalise each channel of (C, H, W) that is not all zero in ``reference``."""
    out = image.copy()
    for c in range(image.shape[0]):
        if reference[c].any():
            out[c] = normalize_percentile(image[c])
    return out


def color_augment(image: np.ndarray, rng: np.random.Generator, cfg: SegAugmentConfig) -> np.ndarray:
    """Grayscale, inversion, third-channel drop, channel permutation and gain/offset jitter of (C, H, W)."""
    x = image.copy()
    present = np.array([c.any() for c in x])
    if rng.random() < cfg.p_gray:
        x[:] = x[present].mean(axis=0) if present.any() else 0
        present[:] = present.any()
    if rng.random() < cfg.p_invert:
        x[present] = 1 - x[present]
    if x.shape[0] >= 3 and rng.random() < cfg.p_drop_third:
        x[2], present[2] = 0, False
    if cfg.permute_channels:
        perm = rng.permutation(x.shape[0])
        x, present = x[perm], present[perm]
    gain = np.exp(rng.uniform(-np.log1p(cfg.contrast), np.log1p(cfg.contrast), x.shape[0]))
    offset = rng.uniform(-cfg.brightness, cfg.brightness, x.shape[0])
    x = x * gain[:, None, None] + offset[:, None, None]
    x[~present] = 0  # empty channels stay empty
    return x.astype(np.float32)


def augment_sample(
    image: np.ndarray, flows: np.ndarray, mask: np.ndarray, diam: float, tile: int,
    rng: np.random.Generator, cfg: SegAugmentConfig, f: float | None = None, classes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One ``tile``² training tile: (image (C, t, t), target (3, t, t) = (foreground, dY, dX) unit flows).

    ``f``: the resize draw (cells become ``diam_mean · f`` px across); None draws it from ``scale_range``.
    ``classes``: a per-pixel class image (H, W) (:mod:`phenoscope.segment.semantic`), warped like the mask
    and appended as a fourth target channel (the random draws are the same with or without it).
    """
    f = log_uniform(rng, cfg.scale_range) if f is None else f
    scale = cfg.diam_mean * f / diam if diam > 0 else f
    a, offset, m = random_affine(image.shape[1:], tile, scale, rng, cfg.rotate)
    img = warp(image, a, offset, tile, order=1)
    flw = rotate_flows(warp(flows, a, offset, tile, order=1), m)
    fg = warp(mask.astype(np.float32), a, offset, tile, order=0)
    extra = [] if classes is None else [warp(classes.astype(np.float32), a, offset, tile, order=0)[None]]
    if rng.random() < cfg.p_degrade:
        img = degrade(img, rng, cfg)
    img = color_augment(img, rng, cfg)
    return img, np.concatenate([fg[None], flw, *extra]).astype(np.float32)


def log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
