"""A generated nuclei sample, so that the first run needs no downloaded data."""

from __future__ import annotations

import numpy as np


def synthetic_nuclei(shape: tuple[int, int] = (512, 512), n: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic fluorescence-like sample: (uint16 image (H, W), uint32 labels (H, W)).

    Non-overlapping ellipses of 6–14 px radius with smooth texture, blur, background and
    Poisson noise. Used by ``phenoscope demo`` so that the first run needs no downloaded data.
    """
    from scipy import ndimage as ndi
    from skimage.draw import ellipse

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    k = 0
    for _ in range(n * 20):
        if k == n:
            break
        r, c = rng.uniform(12, shape[0] - 12), rng.uniform(12, shape[1] - 12)
        ry, rx = rng.uniform(6, 14, 2)
        rr, cc = ellipse(r, c, ry, rx, shape=shape, rotation=rng.uniform(0, np.pi))
        if labels[rr, cc].any() or ndi.binary_dilation(labels > 0, iterations=2)[rr, cc].any():
            continue
        k += 1
        labels[rr, cc] = k
    brightness = rng.uniform(0.5, 1.0, k + 1)
    brightness[0] = 0
    texture = ndi.gaussian_filter(rng.random(shape), 2)
    signal = ndi.gaussian_filter(brightness[labels] * (0.7 + 0.6 * texture), 1.5)
    image = rng.poisson(200 * signal + 20).astype(np.uint16)
    return image, labels
