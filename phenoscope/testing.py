"""Support for tests and benchmarks: importing the reference implementations we compare against, and
comparing label images up to renumbering.

``cellpose`` imports ``torchvision``; see :func:`phenoscope.core.compat.import_torchvision` for the
CPU-only fix. Nothing here is used at run time by phenoscope itself.
"""

from __future__ import annotations

import importlib
import types

import numpy as np

from phenoscope.core.compat import import_torchvision

def import_cellpose() -> types.ModuleType:
    """Import the reference ``cellpose`` package (4.2.1.1) with its submodules loaded.

    Raises ``ImportError`` if cellpose is not installed (install the ``test`` extra).
    """
    import_torchvision()
    cellpose = importlib.import_module("cellpose")
    for sub in ("dynamics", "metrics", "utils", "transforms", "vit", "models", "core"):
        importlib.import_module(f"cellpose.{sub}")
    return cellpose


def label_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(2, n) the distinct (a, b) label pairs of co-located pixels."""
    base = np.int64(b.max()) + 1
    codes = np.unique(a.astype(np.int64).ravel() * base + b.astype(np.int64).ravel())
    return np.stack([codes // base, codes % base])


def crossing_cells(ref: np.ndarray, got: np.ndarray, block: int) -> tuple[int, int]:
    """(cells of ``ref`` with pixels on both sides of a border of a ``block``-px grid, how many of them ``got``
    cuts or merges: a crossing cell is whole when it is exactly one label of ``got`` and that label has no
    other pixels)."""
    crossing: set[int] = set()
    for b in range(block, ref.shape[0], block):
        crossing |= set(np.intersect1d(ref[b - 1], ref[b]).tolist())
    for b in range(block, ref.shape[1], block):
        crossing |= set(np.intersect1d(ref[:, b - 1], ref[:, b]).tolist())
    crossing.discard(0)
    pairs = label_pairs(ref, got)
    per_ref = np.bincount(pairs[0], minlength=ref.max() + 1)  # labels of got that each ref cell touches (incl. 0)
    per_got = np.bincount(pairs[1], minlength=got.max() + 1)
    bad = 0
    for v in crossing:
        mine = pairs[1][pairs[0] == v]
        if len(mine) != 1 or mine[0] == 0 or per_got[mine[0]] != 1 or per_ref[v] != 1:
            bad += 1
    return len(crossing), bad
