"""CellProfiler-style per-cell names: pycytominer's ``infer_cp_features`` finds them, and the values agree
with phenoscope's own per-cell table and with skimage's regionprops on the same masks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phenoscope.datasets import synthetic_nuclei
from phenoscope.interop.cellprofiler import cp_cell_table
from phenoscope.segment.outputs import cell_table


@pytest.fixture(scope="module")
def sample():
    image, labels = synthetic_nuclei(shape=(192, 192), n=20, seed=3)
    rng = np.random.default_rng(0)
    yxc = np.stack([image, rng.integers(0, 1000, image.shape)], axis=-1).astype(np.uint16)
    return labels, yxc


def test_pycytominer_infers_the_features(sample):
    from pycytominer.cyto_utils import infer_cp_features

    labels, yxc = sample
    df = cp_cell_table(labels, yxc, ["DNA", "Actin"])
    features = infer_cp_features(df, compartments=["Cells"])
    assert set(features) == set(df.columns) - {"Metadata_ObjectNumber"}
    assert infer_cp_features(df, metadata=True) == ["Metadata_ObjectNumber"]
    for name in ("Cells_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA", "Cells_Intensity_MeanIntensity_Actin",
                 "Cells_Location_Center_X", "Cells_Location_Center_Y"):
        assert name in features
    nuclei = cp_cell_table(labels, yxc[..., :1], compartment="Nuclei")
    assert "Nuclei_Intensity_MeanIntensity_C0" in infer_cp_features(nuclei, compartments=["Nuclei"])


def test_values_match_cell_table_and_regionprops(sample):
    from skimage.measure import regionprops

    labels, yxc = sample
    cp = cp_cell_table(labels, yxc)
    ours = cell_table(labels, yxc)
    pd.testing.assert_series_equal(cp.Metadata_ObjectNumber, ours.label, check_names=False)
    pairs = {"Cells_AreaShape_Area": "area", "Cells_Location_Center_X": "centroid_x", "Cells_Location_Center_Y": "centroid_y",
             "Cells_Intensity_MeanIntensity_C0": "mean_intensity_c0", "Cells_Intensity_MeanIntensity_C1": "mean_intensity_c1",
             "Cells_AreaShape_BoundingBoxMinimum_X": "bbox_x0", "Cells_AreaShape_BoundingBoxMaximum_Y": "bbox_y1"}
    for a, b in pairs.items():
        np.testing.assert_allclose(cp[a].to_numpy(float), ours[b].to_numpy(float), rtol=1e-6, err_msg=a)
    for row, rp in zip(cp.itertuples(), regionprops(labels.astype(np.int64))):
        assert row.Cells_AreaShape_Perimeter == pytest.approx(rp.perimeter)
        assert row.Cells_AreaShape_FormFactor == pytest.approx(4 * np.pi * rp.area / rp.perimeter**2)
        assert row.Cells_AreaShape_Orientation == pytest.approx(np.degrees(rp.orientation))
        assert row.Cells_AreaShape_Solidity == pytest.approx(rp.solidity)


def test_channel_name_errors(sample):
    labels, yxc = sample
    with pytest.raises(ValueError, match="2 channel names given .* for an image of 1 channel"):
        cp_cell_table(labels, yxc[..., :1], ["DNA", "Actin"])
    with pytest.raises(ValueError, match="letters, digits"):
        cp_cell_table(labels, yxc, ["DNA", "bad name"])
