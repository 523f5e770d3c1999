"""Segmentation output writers: the per-cell table, the overlay and the cellpose ``_seg.npy``."""

from __future__ import annotations

import numpy as np
import pandas as pd
from skimage.measure import regionprops

from phenoscope.datasets import synthetic_nuclei
from phenoscope.segment import outputs


def test_cell_table_has_image_shape_and_intensity_columns(tmp_path):
    image, labels = synthetic_nuclei((128, 128), n=8, seed=3)
    table = outputs.write_cell_table(tmp_path / "a_cells.csv", labels, image[..., None], image_name="a.tif")
    back = pd.read_csv(tmp_path / "a_cells.csv")
    assert list(back.columns[:3]) == ["image", "label", "area"] and (back.image == "a.tif").all()
    assert len(table) == len(back) == labels.max()
    for row, region in zip(back.itertuples(), regionprops(labels.astype(int), intensity_image=image.astype(np.float32))):
        assert row.label == region.label and row.area == region.area
        np.testing.assert_allclose([row.perimeter, row.eccentricity, row.solidity, row.axis_major_length, row.axis_minor_length],
                                   [region.perimeter, region.eccentricity, region.solidity, region.axis_major_length,
                                    region.axis_minor_length], rtol=1e-6)
        np.testing.assert_allclose(row.mean_intensity_c0, region.intensity_mean, rtol=1e-5)


def test_overlay_keeps_an_rgb_image_in_its_own_colours():
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 4), dtype=np.uint8)  # RGBA: alpha is dropped
    masks = np.zeros((64, 64), np.uint16)
    masks[10:30, 10:30] = 1
    over = outputs.overlay_rgb(rgb, masks)
    edge = outputs.outlines(masks)
    np.testing.assert_array_equal(over[~edge], rgb[..., :3][~edge])
    assert (over[edge] == (255, 0, 0)).all()
    gray16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7)[..., None]
    shown = outputs.display_rgb(gray16)
    assert shown.dtype == np.uint8 and shown.shape == (64, 64, 3) and shown.max() == 255 and shown.min() == 0


def test_seg_npy_filename_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    masks = np.zeros((32, 32), np.uint16)
    masks[4:12, 4:12] = 1
    outputs.write_seg_npy(tmp_path / "x_seg.npy", "x.png", masks, None, None, None)
    seg = np.load(tmp_path / "x_seg.npy", allow_pickle=True).item()
    assert seg["filename"] == str(tmp_path / "x.png") and seg["filename"].startswith("/")
