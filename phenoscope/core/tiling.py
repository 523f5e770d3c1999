"""Tiling for network inference on images of any size, with cellpose's padding and tapered blending.

The image is (virtually) zero-padded as cellpose pads it, cut into ``tile``² tiles whose starts are
evenly spaced (``np.linspace``), and the network outputs are averaged with a sigmoid taper weight.
Nothing here materialises the padded image or all tiles: tiles are read one at a time from the
unpadded array and blended into an accumulator the size of the image, so memory is bounded by the
image, the accumulator and the tiles in flight.

Arrays are channel-first: images (C, H, W), network outputs (K, tile, tile).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def pad_widths(ly: int, lx: int, tile: int = 256, div: int = 16, extra: int = 1) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding, as cellpose's ``get_pad_yx(..., min_size=(tile, tile))``.

    Sides ≥ ``tile`` are padded to a multiple of ``div`` plus ``extra·div``; shorter sides up to ``tile``.
    """

    def one(n: int) -> tuple[int, int]:
        pad = int(div * np.ceil(n / div) - n) if n >= tile else max(0, tile - n - extra * div)
        return extra * div // 2 + pad // 2, extra * div // 2 + pad - pad // 2

    return (*one(ly), *one(lx))


def tile_starts(length: int, tile: int = 256, overlap: float = 0.1, augment: bool = False) -> np.ndarray:
    """Start offsets of tiles along an axis of (padded) ``length`` ≥ ``tile`` pixels (cellpose ``make_tiles``).

    Without ``augment`` tiles overlap by at least ``overlap`` (clamped to [0.05, 0.5]) of a tile on each
    side; with ``augment`` (flip TTA) they overlap by half, with at least two tiles per axis.
    """
    if length < tile:
        raise ValueError(f"axis of {length} px is shorter than the tile ({tile} px); pad it first")
    if augment:
        n = max(2, int(np.ceil(2.0 * length / tile)))
    else:
        overlap = min(0.5, max(0.05, overlap))
        n = 1 if length <= tile else int(np.ceil((1.0 + 2 * overlap) * length / tile))
    return np.linspace(0, length - tile, n).astype(int)


def taper_mask(tile: int = 256, sig: float = 7.5) -> np.ndarray:
    """(tile, tile) float32 blending weight: a product of two sigmoids falling off 20 px from the edges."""
    size = max(224, tile)
    xm = np.arange(size)
    xm = np.abs(xm - xm.mean())
    m = 1 / (1 + np.exp((xm - (size / 2 - 20)) / sig))
    m = m * m[:, np.newaxis]
    lo = size // 2 - tile // 2
    return m[lo : lo + tile, lo : lo + tile].astype(np.float32)


@dataclass(frozen=True)
class TileGrid:
    """Tile layout of an (ly, lx) image: padding and tile starts in padded coordinates."""

    ly: int
    lx: int
    tile: int
    pads: tuple[int, int, int, int]
    ystarts: np.ndarray
    xstarts: np.ndarray

    def __len__(self) -> int:
        return len(self.ystarts) * len(self.xstarts)

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        """Yield (j, i, y0, x0): grid row/column and the tile's top-left corner in image coordinates."""
        for j, ys in enumerate(self.ystarts):
            for i, xs in enumerate(self.xstarts):
                yield j, i, int(ys) - self.pads[0], int(xs) - self.pads[2]


def tile_grid(ly: int, lx: int, tile: int = 256, overlap: float = 0.1, augment: bool = False) -> TileGrid:
    """The cellpose tile layout for an (ly, lx) image."""
    if ly < 1 or lx < 1:
        raise ValueError(f"image must have at least one pixel, got {ly}×{lx}")
    pads = pad_widths(ly, lx, tile)
    return TileGrid(
        ly, lx, tile, pads,
        tile_starts(ly + pads[0] + pads[1], tile, overlap, augment),
        tile_starts(lx + pads[2] + pads[3], tile, overlap, augment),
    )


def _overlap(y0: int, x0: int, tile: int, ly: int, lx: int) -> tuple[slice, slice, slice, slice]:
    """Image slices and matching tile slices of a tile at (y0, x0) clipped to the image."""
    ya, yb = max(0, y0), min(ly, y0 + tile)
    xa, xb = max(0, x0), min(lx, x0 + tile)
    return slice(ya, yb), slice(xa, xb), slice(ya - y0, yb - y0), slice(xa - x0, xb - x0)


def read_tile(image: np.ndarray, y0: int, x0: int, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (C_out, tile, tile) with the image (C, H, W) window at (y0, x0); zeros outside
    the image and in channels C..C_out (zero-padding of missing channels)."""
    tile = out.shape[-1]
    iy, ix, ty, tx = _overlap(y0, x0, tile, image.shape[-2], image.shape[-1])
    out[...] = 0
    out[: image.shape[0], ty, tx] = image[:, iy, ix]
    return out


def flip_tile(tile: np.ndarray, j: int, i: int) -> np.ndarray:
    """Cellpose's TTA flip for grid position (j, i): odd columns flip Y, odd rows flip X (a view)."""
    if i % 2:
        tile = tile[..., ::-1, :]
    if j % 2:
        tile = tile[..., :, ::-1]
    return tile


def unflip_output(y: np.ndarray, j: int, i: int) -> np.ndarray:
    """Undo :func:`flip_tile` on a (3, tile, tile) output (dY, dX, cellprob), negating flipped flows."""
    y = flip_tile(y, j, i).copy()
    if i % 2:
        y[0] *= -1
    if j % 2:
        y[1] *= -1
    return y


def blend_tile(acc: np.ndarray, weight: np.ndarray, y: np.ndarray, y0: int, x0: int, mask: np.ndarray) -> None:
    """Add ``y·mask`` (K, tile, tile) into ``acc`` (K, H, W) and ``mask`` into ``weight`` (H, W), in place,
    for a tile at (y0, x0) (image coordinates, possibly negative); parts outside the image are dropped."""
    iy, ix, ty, tx = _overlap(y0, x0, mask.shape[-1], weight.shape[0], weight.shape[1])
    acc[:, iy, ix] += y[:, ty, tx] * mask[ty, tx]
    weight[iy, ix] += mask[ty, tx]
