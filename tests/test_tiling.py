"""Tiling geometry and blending vs cellpose's ``get_pad_yx`` / ``make_tiles`` / ``average_tiles``."""

from __future__ import annotations

import numpy as np
import pytest

from phenoscope.core.tiling import blend_tile, flip_tile, pad_widths, read_tile, taper_mask, tile_grid, unflip_output


@pytest.fixture(scope="module")
def transforms():
    return pytest.importorskip("phenoscope.testing").import_cellpose().transforms


SHAPES = [(200, 200), (256, 256), (241, 255), (700, 500), (1400, 1100), (17, 900)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("augment", [False, True])
def test_layout_matches_cellpose(transforms, shape, augment):
    ly, lx = shape
    pads = transforms.get_pad_yx(ly, lx, min_size=(256, 256))
    assert pad_widths(ly, lx) == tuple(pads)
    padded = np.zeros((1, ly + pads[0] + pads[1], lx + pads[2] + pads[3]), np.float32)
    _, ysub, xsub, _, _ = transforms.make_tiles(padded, bsize=256, augment=augment, tile_overlap=0.1)
    grid = tile_grid(ly, lx, 256, 0.1, augment)
    starts = [(y0 + pads[0], x0 + pads[2]) for _, _, y0, x0 in grid]
    assert starts == [(int(y[0]), int(x[0])) for y, x in zip(ysub, xsub)]


def test_taper_mask_matches_cellpose(transforms):
    np.testing.assert_allclose(taper_mask(256), transforms._taper_mask(256, 256), rtol=1e-6)


@pytest.mark.parametrize("augment", [False, True])
def test_blend_matches_average_tiles(transforms, augment):
    rng = np.random.default_rng(0)
    ly, lx = 300, 530
    image = rng.random((2, ly, lx), dtype=np.float32)
    grid = tile_grid(ly, lx, 256, 0.1, augment)
    # "network" = identity on channel 0 plus per-tile noise, so blending weights matter
    acc = np.zeros((3, ly, lx), np.float32)
    weight = np.zeros((ly, lx), np.float32)
    outs = []
    for j, i, y0, x0 in grid:
        tile = read_tile(image, y0, x0, np.empty((3, 256, 256), np.float32))
        if augment:
            tile = flip_tile(tile, j, i)
        y = tile + rng.random((3, 256, 256), dtype=np.float32)
        outs.append(y.copy())
        blend_tile(acc, weight, unflip_output(y, j, i) if augment else y, y0, x0, taper_mask(256))
    acc /= weight
    p = grid.pads
    ysub = [[y0 + p[0], y0 + p[0] + 256] for _, _, y0, _ in grid]
    xsub = [[x0 + p[2], x0 + p[2] + 256] for _, _, _, x0 in grid]
    y = np.stack(outs)
    if augment:
        y = transforms.unaugment_tiles(y.reshape(len(grid.ystarts), len(grid.xstarts), 3, 256, 256)).reshape(-1, 3, 256, 256)
    expected = transforms.average_tiles(y, ysub, xsub, ly + p[0] + p[1], lx + p[2] + p[3])
    np.testing.assert_allclose(acc, expected[:, p[0] : p[0] + ly, p[2] : p[2] + lx], atol=1e-5)


def test_read_tile_zero_pads_outside_and_missing_channels():
    image = np.ones((1, 20, 30), np.float32)
    out = read_tile(image, -5, 25, np.full((3, 16, 16), 7, np.float32))
    assert out[0, 5:, :5].all() and out[0, :5].sum() == 0 and out[0, :, 5:].sum() == 0
    assert out[1:].sum() == 0


def test_bad_geometry():
    with pytest.raises(ValueError, match="at least one pixel"):
        tile_grid(0, 10)
