"""DSB 2018 nuclei (BBBC038 stage 1 train): index, images, labels, and mosaics of real label crops.

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
