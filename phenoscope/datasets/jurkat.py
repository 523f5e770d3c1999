"""Jurkat cell-cycle single-cell crops (3 channels: bright field, DNA, dark field; 7 phases)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from phenoscope.datasets.root import dataset_path

JURKAT_NPZ = "jurkat_cellcycle_crops_40px.npz"
DNA_CHANNEL = 1  # channel order: bright field, DNA, dark field


def jurkat_npz(path: str | Path | None = None) -> Path:
    """The ``.npz`` (arrays ``images`` (N, 3, 40, 40) and ``labels`` (N,) phase names): ``path`` itself if it is
    a file, ``path/<JURKAT_NPZ>`` for a folder, else the shared data set's."""
    if path is None:
        return dataset_path("jurkat_cellcycle", JURKAT_NPZ)
    path = Path(path)
    return path / JURKAT_NPZ if path.is_dir() else path


def load_jurkat(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 3, 40, 40), class ids (N,) in [0, 7), phase names (7,) sorted) of the Jurkat crops
    (``path`` as in :func:`jurkat_npz`)."""
    with np.load(jurkat_npz(path), allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    names, y = np.unique(labels, return_inverse=True)
    return images, y, names
