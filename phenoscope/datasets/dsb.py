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


def image_mosaic(root: str | Path, size: int = 1024, tile: int = 256, modality: str = "fluorescence_gray",
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size) uint8 gray image and its uint32 labels tiled from the top-left ``tile``² crops of
    random DSB images of one ``modality`` (``index.csv``'s ``modality_heuristic``; gray = the channels'
    maximum), shifted by half a tile so that a grid of ``tile``-multiples cuts through crops, not along
    their seams. Labels are renumbered 1..N."""
    idx = dsb_index(root)
    idx = idx[(idx["modality_heuristic"] == modality) & (idx["height"] >= tile) & (idx["width"] >= tile)]
    k = -(-size // tile)
    if len(idx) < k * k:
        raise ValueError(f"{len(idx)} {modality} DSB images of ≥ {tile}² px cannot fill a {size}² mosaic without repeats")
    ids = np.random.default_rng(seed).permutation(idx["image_id"].to_numpy())[: k * k]
    image = np.zeros((k * tile, k * tile), np.uint8)
    labels = np.zeros((k * tile, k * tile), np.uint32)
    offset = 0
    for i, image_id in enumerate(ids):
        r, c = divmod(i, k)
        cell = (slice(r * tile, (r + 1) * tile), slice(c * tile, (c + 1) * tile))
        image[cell] = dsb_image(root, image_id)[:tile, :tile].max(axis=-1)
        lab = relabel_sequential(dsb_labels(root, image_id)[:tile, :tile].astype(np.uint32))[0]
        labels[cell] = np.where(lab > 0, lab + offset, 0)
        offset += int(lab.max())
    shift = (tile // 2, tile // 2)
    image, labels = np.roll(image, shift, (0, 1))[:size, :size], np.roll(labels, shift, (0, 1))[:size, :size]
    return image, relabel_sequential(labels)[0]
