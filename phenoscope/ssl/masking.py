"""BEiT block masking and dinov2's per-batch mask-ratio schedule."""

from __future__ import annotations

import math

import numpy as np


def block_mask(
    grid: tuple[int, int],
    n_target: int,
    rng: np.random.Generator,
    min_patches: int = 4,
    max_patches: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """BEiT ``MaskingGenerator``: add random rectangles until ~``n_target`` patches are masked.

    Args:
        grid: (H, W) patch grid.
        n_target: wanted number of masked patches (the result may fall short, never exceed it).
        max_patches: largest single block (default half the grid, as dinov2).
    Returns:
        bool (H, W) mask.
    """
    h, w = grid
    max_patches = max_patches or int(0.5 * h * w)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    mask = np.zeros(grid, dtype=bool)
    count = 0
    while count < n_target:
        budget = min(n_target - count, max_patches)
        delta = 0
        for _ in range(10):
            area = min_patches + (budget - min_patches) * rng.random()  # random.uniform semantics
            ratio = math.exp(rng.uniform(*log_aspect))
            bh, bw = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if bw < w and bh < h:
                top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
                block = mask[top : top + bh, left : left + bw]
                new = bh * bw - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    return mask


def batch_masks(
    n_images: int,
    grid: tuple[int, int],
    rng: np.random.Generator,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
) -> np.ndarray:
    """dinov2 collate masking: ``int(n_images * mask_probability)`` images get block masks.

    The i-th masked image targets ``uniform(r_i, r_{i+1})`` of its patches, where the r's split
    ``ratio_range`` into equal steps; the others are unmasked; the order is shuffled.
    Returns bool (n_images, H*W).
    """
    n_patches = grid[0] * grid[1]
    n_masked = int(n_images * mask_probability)
    edges = np.linspace(ratio_range[0], ratio_range[1], n_masked + 1)
    masks = [block_mask(grid, int(n_patches * rng.uniform(edges[i], edges[i + 1])), rng).ravel() for i in range(n_masked)]
    masks += [np.zeros(n_patches, dtype=bool)] * (n_images - n_masked)
    out = np.stack(masks)
    return out[rng.permutation(n_images)]
