"""Readers for the public data sets we develop and evaluate on (DSB 2018 nuclei), and label mosaics.

DSB 2018 layout (``dsb2018_train/``): ``images/<id>.png``, ``labels/<id>.tif``, ``index.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from skimage.segmentation import relabel_sequential

from phenoscope.core.io import imread


def dsb_index(root: str | Path) -> pd.DataFrame:
    """The ``index.csv`` table (image_id, height, width, modality_heuristic, n_objects), sorted by id."""
    return pd.read_csv(Path(root) / "index.csv").sort_values("image_id").reset_index(drop=True)


def dsb_labels(root: str | Path, image_id: str) -> np.ndarray:
    """uint16 instance labels (H, W) of one DSB image, 0 = background."""
    return imread(Path(root) / "labels" / f"{image_id}.tif")


def dsb_image(root: str | Path, image_id: str) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image of one DSB sample (alpha dropped)."""
    return imread(Path(root) / "images" / f"{image_id}.png")[..., :3]


def label_mosaic(root: str | Path, size: int = 1024, n_objects: int = 650, seed: int = 0, tile: int = 256) -> np.ndarray:
    """Tile real DSB label crops into a (size, size) uint32 label image with about ``n_objects`` objects.

    Each ``tile``² cell of the mosaic is the top-left crop of a DSB label image whose crop holds
    close to ``n_objects / cells`` objects; labels are renumbered 1..N (sequential).
    """
    idx = dsb_index(root)
    rng = np.random.default_rng(seed)
    cells = (size // tile) ** 2
    per_cell = n_objects / cells
    crops, counts = [], []
    for image_id in rng.permutation(idx["image_id"].to_numpy()):
        lab = dsb_labels(root, image_id)[:tile, :tile]
        if lab.shape != (tile, tile):
            continue
        n = len(np.unique(lab)) - 1
        if abs(n - per_cell) <= 0.35 * per_cell:
            crops.append(lab)
            counts.append(n)
        if len(crops) == cells:
            break
    if len(crops) < cells:
        raise ValueError(f"not enough DSB crops with ~{per_cell:.0f} objects to fill a {size}² mosaic")
    out = np.zeros((size, size), np.uint32)
    k = size // tile
    offset = 0
    for i, lab in enumerate(crops):
        lab = relabel_sequential(lab.astype(np.uint32))[0]
        r, c = divmod(i, k)
        out[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = np.where(lab > 0, lab + offset, 0)
        offset += int(lab.max())
    return relabel_sequential(out)[0]


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
