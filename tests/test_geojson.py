"""QuPath GeoJSON from ``phenoscope segment --save-geojson``: read back with shapely, rasterised independently
(shapely point-in-polygon at pixel centres) and compared with the label TIFF cell by cell."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from phenoscope.cli import main
from phenoscope.datasets import dsb_index
from phenoscope.interop.geojson import cell_features

shapely = pytest.importorskip("shapely")
from shapely.geometry import shape  # noqa: E402

MIN_IOU = 0.95  # acceptance: per-cell IoU of the rasterised polygon against its mask


def rasterise(geometry: dict, shape_hw: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W): pixels whose centre (QuPath's corner-origin coordinates: x = col + 0.5) is inside."""
    geom = shape(geometry)
    x0, y0, x1, y1 = geom.bounds
    r0, c0 = max(int(np.floor(y0)), 0), max(int(np.floor(x0)), 0)
    r1, c1 = min(int(np.ceil(y1)), shape_hw[0]), min(int(np.ceil(x1)), shape_hw[1])
    rr, cc = np.mgrid[r0:r1, c0:c1]
    out = np.zeros(shape_hw, bool)
    out[r0:r1, c0:c1] = shapely.contains_xy(geom, cc + 0.5, rr + 0.5)
    return out


def per_cell_iou(features: list[dict], masks: np.ndarray) -> dict[int, float]:
    ious = {}
    for f in features:
        label = int(f["properties"]["name"])
        got, want = rasterise(f["geometry"], masks.shape), masks == label
        ious[label] = float((got & want).sum() / (got | want).sum())
    return ious


def check_qupath_schema(collection: dict) -> None:
    assert collection["type"] == "FeatureCollection"
    for f in collection["features"]:
        assert f["type"] == "Feature"
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        assert f["properties"]["objectType"] == "detection"
        assert all(isinstance(v, (int, float)) for v in f["properties"]["measurements"].values())
        assert shape(f["geometry"]).is_valid


@pytest.fixture(scope="module")
def dsb_image(dsb_dir, tmp_path_factory):
    idx = dsb_index(dsb_dir)
    image_id = idx[(idx.height <= 260) & (idx.width <= 360) & (idx.n_objects >= 20)].image_id.iloc[0]
    folder = tmp_path_factory.mktemp("in")
    shutil.copy(dsb_dir / "images" / f"{image_id}.png", folder / "dsb.png")
    return folder / "dsb.png"


@pytest.mark.parametrize("cp_names", [False, True])
def test_segment_geojson_rasterises_back_to_masks(dsb_image, tmp_path, cp_names):
    out = tmp_path / "out"
    args = ["segment", str(dsb_image), "--out", str(out), "--save-geojson"] + ["--cp-names"] * cp_names
    assert main(args) == 0
    masks = tifffile.imread(out / "dsb_masks.tif")
    table = pd.read_csv(out / "dsb_cells.csv")
    collection = json.loads((out / "dsb_cells.geojson").read_text())
    check_qupath_schema(collection)
    features = collection["features"]
    assert masks.max() >= 10 and len(features) == len(np.unique(masks)) - 1
    ious = per_cell_iou(features, masks)
    assert min(ious.values()) >= MIN_IOU, sorted(ious.items(), key=lambda kv: kv[1])[:5]
    keys = set(table.select_dtypes("number").columns) - {"label", "Metadata_ObjectNumber"}  # measurements are numeric
    label_col = "Metadata_ObjectNumber" if cp_names else "label"
    by_label = table.set_index(label_col)
    for f in features:
        m = f["properties"]["measurements"]
        assert set(m) == keys
        row = by_label.loc[int(f["properties"]["name"])]
        np.testing.assert_allclose([m[k] for k in sorted(keys)], [row[k] for k in sorted(keys)], rtol=1e-6)


def test_holes_diagonals_and_components_are_exact():
    masks = np.zeros((40, 40), np.uint16)
    masks[2:20, 2:20] = 1
    masks[8:12, 8:12] = 0  # a hole
    masks[25, 25] = masks[26, 26] = masks[27, 27] = 2  # diagonal chain
    masks[30:33, 2:5] = masks[30:33, 10:14] = 3  # two components of one label
    masks[0, 30:40] = 4  # touching the image border
    features = cell_features(masks)
    assert [f["geometry"]["type"] for f in features] == ["Polygon", "Polygon", "MultiPolygon", "Polygon"]
    assert len(features[0]["geometry"]["coordinates"]) == 2  # shell + hole
    ious = per_cell_iou(features, masks)
    assert ious == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}


def test_classes_and_empty():
    masks = np.zeros((20, 20), np.uint8)
    assert cell_features(masks) == []
    masks[5:9, 5:9] = 1
    (f,) = cell_features(masks, classes={1: "Tumor"})
    assert f["properties"]["classification"] == {"name": "Tumor"}
