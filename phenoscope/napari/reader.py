"""napari reader: cellpose-style ``_seg.npy`` files (as ``phenoscope segment --save-seg`` writes them).

A ``_seg.npy`` is a pickled dict (cellpose's format), so it is loaded with ``allow_pickle``: open
only files you trust, as with cellpose's GUI.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

LayerData = tuple[np.ndarray, dict, str]


def read_seg_npy(path: str | Path) -> list[LayerData]:
    """``[(masks, {"name": ...}, "labels")]`` from a ``_seg.npy``; raises ``ValueError`` naming the file."""
    path = Path(path)
    try:
        dat = np.load(path, allow_pickle=True).item()
        masks = np.asarray(dat["masks"])
    except Exception as err:  # not a pickled dict, no 'masks' key, truncated file
        raise ValueError(f"{path}: not a cellpose _seg.npy ({type(err).__name__}: {err})") from err
    if masks.ndim not in (2, 3) or masks.dtype.kind not in "ui":
        raise ValueError(f"{path}: 'masks' is not a 2D/3D integer label image (shape {masks.shape}, {masks.dtype})")
    name = path.name.removesuffix("_seg.npy")
    return [(masks, {"name": f"{name}_masks"}, "labels")]


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """npe2 reader contribution: a reader for one ``*_seg.npy`` path, else None (napari tries others)."""
    if isinstance(path, list):
        return None
    return read_seg_npy if str(path).endswith("_seg.npy") else None
