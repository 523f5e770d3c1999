"""End-to-end ``phenoscope segment`` on real DSB 2018 images with a tiny random network."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from phenoscope.cli import main
from phenoscope.datasets import dsb_index
from phenoscope.segment.checkpoint import save_model
from phenoscope.segment.net import build_net, variant


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    net = build_net(variant("tiny", depth=2))
    with torch.no_grad():  # a cell-probability bias so the random network yields some masks
        net.out.bias.view(3, -1)[2] += 2.0
    return save_model(net, tmp_path_factory.mktemp("model") / "tiny_random")


@pytest.fixture(scope="module")
def images(dsb_dir, tmp_path_factory):
    """Three small real DSB images copied to a scratch input folder."""
    idx = dsb_index(dsb_dir)
    small = idx[(idx.height <= 260) & (idx.width <= 360)].image_id[:3]
    folder = tmp_path_factory.mktemp("in")
    for image_id in small:
        shutil.copy(dsb_dir / "images" / f"{image_id}.png", folder / f"{image_id}.png")
    return folder


def test_segment_folder_writes_outputs_that_load_back(tiny_model, images, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment", str(images), "--out", str(out), "--model", str(tiny_model),
            "--save-seg", "--save-outlines", "--save-rois", "--batch-size", "4",
            "--flow-threshold", "0"]  # no flow QC: a random network yields masks only without it
    assert main(args) == 0
    for png in sorted(images.glob("*.png")):
        masks = tifffile.imread(out / f"{png.stem}_masks.tif")
        shape = tifffile.imread(out / f"{png.stem}_masks.tif").shape
        from phenoscope.core.io import imread

        assert shape == imread(png).shape[:2] and masks.dtype == np.uint16
        cells = pd.read_csv(out / f"{png.stem}_cells.csv")
        assert list(cells.columns[:9]) == ["label", "area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0",
                                           "bbox_y1", "bbox_x1", "mean_intensity_c0"]
        assert sorted(cells.label) == sorted(set(np.unique(masks)) - {0})
        assert (cells.area.to_numpy() == np.bincount(masks.ravel())[cells.label]).all()
        seg = np.load(out / f"{png.stem}_seg.npy", allow_pickle=True).item()
        np.testing.assert_array_equal(seg["masks"], masks)
        assert seg["flows"][4].shape == (3, *shape)
        from PIL import Image

        assert np.asarray(Image.open(out / f"{png.stem}_outlines.png")).shape == (*shape, 3)
        import roifile

        rois = roifile.roiread(out / f"{png.stem}_rois.zip") if masks.max() else []
        assert len(rois if isinstance(rois, list) else [rois]) == masks.max()
    assert any(tifffile.imread(p).max() > 0 for p in out.glob("*_masks.tif"))
    # a second run skips everything
    capsys.readouterr()
    assert main(args) == 0
    assert "skipped 3" in capsys.readouterr().err


def test_bad_files_get_one_line_each_and_batch_continues(tiny_model, images, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = sorted(images.glob("*.png"))[0]
    shutil.copy(good, bad / "good.png")
    (bad / "corrupt.png").write_bytes(good.read_bytes()[:40] + b"\x00garbage" * 50)
    tifffile.imwrite(bad / "full.tif", np.random.default_rng(0).integers(0, 255, (300, 300), np.uint8))
    (bad / "truncated.tif").write_bytes((bad / "full.tif").read_bytes()[:200])
    (bad / "full.tif").unlink()
    (bad / "empty.png").write_bytes(b"")
    tifffile.imwrite(bad / "one_pixel.tif", np.ones((1, 1), np.uint8))
    tifffile.imwrite(bad / "nan.tif", np.full((64, 64), np.nan, np.float32))
    out = tmp_path / "out"
    code = main(["segment", str(bad), "--out", str(out), "--model", str(tiny_model)])
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 1
    for name in ("corrupt.png", "truncated.tif", "empty.png", "one_pixel.tif", "nan.tif"):
        assert sum(name in line for line in errors) == 1, (name, errors)
    assert len(errors) == 5
    assert (out / "good_masks.tif").exists() and (out / "good_cells.csv").exists()

    # wrong --channel-axis: one line for the (H, W, 4) PNG, exit code 1
    code = main(["segment", str(bad / "good.png"), "--out", str(out), "--model", str(tiny_model),
                 "--channel-axis", "0", "--overwrite"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "channel" in errors[0]


def test_classic_model_and_missing_inputs(images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(images / "*.png"), str(tmp_path / "nothing_here"), "--out", str(out), "--model", "classic"])
    assert code == 1  # the missing input is an error, the images are still segmented
    assert "nothing_here: no images found" in capsys.readouterr().err
    assert len(list(out.glob("*_masks.tif"))) == 3


def test_model_file_missing(images, tmp_path, capsys):
    assert main(["segment", str(images), "--out", str(tmp_path), "--model", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
