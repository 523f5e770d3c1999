"""3D segmentation from 2D planes vs cellpose 4.2.1.1 ``eval(do_3D=True)`` (same random cpsam weights, cut to
1 block: the same code path, fast enough for the default suite), cellpose's ``stitch3D``, and the volume helpers. Volumes are stacked from real
DSB label images (each plane a real image, the same nuclei slightly shifted from plane to plane)."""

from __future__ import annotations

import numpy as np
import pytest
from test_inference import cellpose_pair, dsb_canvas

from phenoscope.datasets import dsb_index, dsb_labels
from phenoscope.segment.options import MaskOptions
from phenoscope.segment.volume import resize_volume, stitch_planes, volume_input

TOL = 1e-3  # as the 2D comparison: fp32 tiled network outputs, summed over three orientations


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return cellpose_pair(tmp_path_factory.mktemp("cpsam"), 1)


@pytest.fixture(scope="module")
def outputs(pair, dsb_dir):
    """cellpose's and our (dP, cellprob) of one small real volume."""
    theirs, ours = pair
    vol = _volume(dsb_dir)
    _, flows, _ = theirs.eval(vol, do_3D=True, z_axis=0, channel_axis=3, compute_masks=False)
    return (flows[1], flows[2]), ours.predict_3d(vol, z_axis=0, channel_axis=3), vol.shape


def _volume(dsb_dir, depth=4, size=(24, 20)):
    """(Z, Y, X, 3) uint8: a real DSB image shifted by one pixel per plane."""
    img = dsb_canvas(dsb_dir, (size[0] + depth, size[1] + depth))
    return np.stack([img[z : z + size[0], z : z + size[1]] for z in range(depth)])


def test_3d_flows_match_cellpose_do_3d(outputs):
    (ref_dP, ref_prob), (dP, prob), shape = outputs
    assert dP.shape == ref_dP.shape == (3, *shape[:3]) and prob.shape == ref_prob.shape
    d_flow, d_prob = np.abs(dP - ref_dP).max(), np.abs(prob - ref_prob).max()
    print(f"3D: max |Δflow| {d_flow:.2e}, max |Δcellprob| {d_prob:.2e}")
    assert d_flow <= TOL and d_prob <= TOL


def test_3d_masks_from_the_same_outputs_match_cellpose(pair, outputs):
    """Given the same network outputs, 3D dynamics give cellpose's masks (up to label numbering)."""
    cellpose = pytest.importorskip("phenoscope.testing").import_cellpose()
    _, ours = pair
    dP, prob = outputs[1]
    prob = prob + 2.0  # a random network is unsure everywhere; make some foreground
    ref = cellpose.dynamics.compute_masks(dP, prob, niter=200, cellprob_threshold=0.0, flow_threshold=0.0, do_3D=True,
                                          min_size=5)
    got = ours.masks(dP, prob, options=MaskOptions(min_size=5))
    assert ref.max() > 0
    pairs = {(a, b) for a, b in zip(ref.ravel(), got.ravel())}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})  # a bijection of labels


def test_stitch_planes_equals_cellpose_stitch3d(dsb_dir):
    cellpose = pytest.importorskip("phenoscope.testing").import_cellpose()
    ids = dsb_index(dsb_dir).image_id[:3]
    lab = np.stack([dsb_labels(dsb_dir, i)[:96, :96] for i in ids]).astype(np.int64)
    planes = np.stack([lab[0], np.roll(lab[0], 2, axis=1), np.zeros_like(lab[0]), lab[1], np.roll(lab[1], 3, axis=0), lab[2]])
    for threshold in (0.25, 0.6):
        ref = cellpose.utils.stitch3D(planes.astype(np.uint32).copy(), stitch_threshold=threshold)
        np.testing.assert_array_equal(stitch_planes(planes, threshold), ref)


def test_volume_axes_resize_and_errors():
    vol = np.random.default_rng(0).random((2, 5, 16, 20)).astype(np.float32)  # (C, Z, Y, X)
    x = volume_input(vol, z_axis=1, channel_axis=0)
    assert x.shape == (2, 5, 16, 20) and x.dtype == np.float32
    assert volume_input(vol[0], z_axis=0).shape == (1, 5, 16, 20)
    assert resize_volume(x, 10, 8, 10).shape == (2, 10, 8, 10)
    with pytest.raises(ValueError, match="z_axis=4 is out of range"):
        volume_input(vol, z_axis=4)
    with pytest.raises(ValueError, match="ZYX or 4D"):
        volume_input(vol[0, 0])


def test_cli_segments_a_volume_as_the_api_does(tmp_path, dsb_dir, capsys):
    """``phenoscope segment --do-3d`` writes the same (Z, Y, X) masks as ``segment_3d`` and a 3D cell table;
    a Z axis out of range is reported per file, 2D-only outputs and ``classic`` are refused before any work."""
    import pandas as pd
    import tifffile

    from phenoscope.cli import main
    from phenoscope.core.io import imwrite_tiff
    from phenoscope.segment import load_model

    vol = np.moveaxis(_volume(dsb_dir, depth=6, size=(48, 40))[..., 0], 0, 1)  # (Y, Z, X): Z on axis 1
    imwrite_tiff(tmp_path / "vol.tif", vol)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "vol.tif"), "--out", str(out), "--do-3d", "--z-axis", "1",
                 "--anisotropy", "1.5", "--diameter", "20"]) == 0
    masks = tifffile.imread(out / "vol_masks.tif")
    expected = load_model().segment_3d(vol, z_axis=1, diameter=20, anisotropy=1.5).masks
    assert masks.shape == (6, 48, 40) and masks.max() > 0 and np.array_equal(masks, expected)
    cells = pd.read_csv(out / "vol_cells.csv")
    assert len(cells) == masks.max() and {"centroid_z", "bbox_z1", "mean_intensity_c0"} <= set(cells.columns)
    assert (cells["area"].to_numpy() == np.bincount(masks.ravel())[1:][np.bincount(masks.ravel())[1:] > 0]).all()
    capsys.readouterr()
    assert main(["segment", str(tmp_path / "vol.tif"), "--out", str(tmp_path / "bad"), "--do-3d", "--z-axis", "3",
                 "--diameter", "20"]) == 1
    assert "z_axis=3 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "vol_masks.tif").exists()
    for extra, problem in ((["--save-outlines"], "outlines: 2D outputs"), (["--model", "classic"], "2D images only"),
                           (["--diameter", "auto"], "'auto' is 2D only")):
        assert main(["segment", str(tmp_path / "vol.tif"), "--out", str(tmp_path / "no"), "--do-3d", *extra]) == 2
        assert problem in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "vol.tif"), "--out", str(tmp_path / "no"), "--z-axis", "1"]) == 2
    assert "volumes only" in capsys.readouterr().err


def test_plane_by_plane_flows_match_cellpose_stitch_mode(pair, dsb_dir):
    """cellpose's stitch mode (2D eval of every Z plane of a volume normalised as a whole) and our
    ``segment_planes`` see the same per-plane flows; the stitching itself is tested against stitch3D above."""
    theirs, ours = pair
    vol = _volume(dsb_dir)
    _, flows, _ = theirs.eval(vol, z_axis=0, channel_axis=3, stitch_threshold=0.25, compute_masks=False)
    res = ours.segment_planes(vol, z_axis=0, channel_axis=3, stitch_threshold=0.25)
    assert res.flows.shape == flows[1].shape == (2, *vol.shape[:3]) and res.masks.shape == vol.shape[:3]
    assert np.abs(res.flows - flows[1]).max() <= TOL and np.abs(res.cellprob - flows[2]).max() <= TOL


def test_cli_stitch_threshold(tmp_path, dsb_dir):
    import tifffile

    from phenoscope.cli import main
    from phenoscope.core.io import imwrite_tiff
    from phenoscope.segment import load_model

    from phenoscope.datasets import image_mosaic

    img = image_mosaic(dsb_dir, 256, 256, seed=1)[0]  # real fluorescence nuclei
    vol = np.stack([np.roll(img, z, 1) for z in range(5)])
    imwrite_tiff(tmp_path / "vol.tif", vol)
    assert main(["segment", str(tmp_path / "vol.tif"), "--out", str(tmp_path / "out"), "--do-3d",
                 "--stitch-threshold", "0.25", "--diameter", "30"]) == 0
    masks = tifffile.imread(tmp_path / "out" / "vol_masks.tif")
    expected = load_model().segment_planes(vol, diameter=30, stitch_threshold=0.25).masks
    assert masks.max() > 0 and np.array_equal(masks, expected)
    # a nucleus shifted by a pixel per plane is one 3D object through several planes
    assert max(len(np.unique(np.nonzero(masks == v)[0])) for v in np.unique(masks)[1:]) >= 3
    assert main(["segment", str(tmp_path / "vol.tif"), "--out", str(tmp_path / "no"), "--stitch-threshold", "0.25"]) == 2
