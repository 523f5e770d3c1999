"""The shipped default model: size, strict loading, accuracy on held-out DSB images, offline CLI use."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from phenoscope.cli import main
from phenoscope.core.checkpoint import read_checkpoint
from phenoscope.datasets import dsb_image, dsb_labels
from phenoscope.eval.segmentation import average_precision, error_rate
from phenoscope.segment import load_model, segment_classic
from phenoscope.segment.checkpoint import DEFAULT_MODEL

VAL_IDS = DEFAULT_MODEL.parent / "dsb2018_val_ids.txt"


def _val_ids() -> list[str]:
    return [s.strip() for s in VAL_IDS.read_text().splitlines() if s.strip() and not s.startswith("#")]


def test_default_model_ships_small_with_card_and_split():
    assert DEFAULT_MODEL.stat().st_size <= 30 * 2**20
    config = read_checkpoint(DEFAULT_MODEL).config
    assert config["depth"] == 6 and config["tile"] == 128 and config["size_head"]
    card = (DEFAULT_MODEL.parent / "default.md").read_text()
    assert "phenoscope train" in card and "AP@0.5" in card
    assert len(_val_ids()) == 82


def test_default_model_segments_held_out_images(dsb_dir):
    # a guard against a broken or swapped model, on 12 validation images never trained on. The headline
    # numbers over all 82 (AP@0.5 0.71, below the 0.80 goal) come from benchmarks/eval_default_model.py.
    train = json.loads((DEFAULT_MODEL.parent / "default_split.json").read_text())["train"]
    ids = _val_ids()[::7][:12]
    assert not set(ids) & set(train)
    model = load_model()
    truth = [dsb_labels(dsb_dir, i) for i in ids]
    ours = average_precision(truth, [model.segment(dsb_image(dsb_dir, i)).masks for i in ids], [0.5])
    classic = average_precision(truth, [segment_classic(dsb_image(dsb_dir, i)) for i in ids], [0.5])
    ap, ap_classic = ours[0].mean(), classic[0].mean()
    err, err_classic = np.nanmean(error_rate(*ours[1:])), np.nanmean(error_rate(*classic[1:]))
    assert ap > 0.7 and ap > ap_classic + 0.1, (ap, ap_classic)
    assert err < 0.6 * err_classic, (err, err_classic)


def test_segment_cli_uses_the_default_model_offline(dsb_dir, tmp_path):
    image_id = _val_ids()[0]
    png = tmp_path / "some_image.png"
    Image.fromarray(dsb_image(dsb_dir, image_id)).save(png)
    assert main(["segment", str(png), "--out", str(tmp_path / "out"), "--save-outlines"]) == 0
    masks = tifffile.imread(tmp_path / "out" / "some_image_masks.tif")
    cells = pd.read_csv(tmp_path / "out" / "some_image_cells.csv")
    assert masks.shape == dsb_labels(dsb_dir, image_id).shape and len(cells) == masks.max() > 0
    assert (tmp_path / "out" / "some_image_outlines.png").stat().st_size > 0
    assert np.array_equal(masks, load_model().segment(dsb_image(dsb_dir, image_id)).masks)


def test_default_segment_resizes_by_the_size_head(dsb_dir):
    """The shipped model has a size head: with no diameter, each image is resized by its estimate, which
    must be within 30 % of the true median diameter on most held-out images of every size."""
    from phenoscope.segment.flows import diameter

    model = load_model()
    assert model.net.size is not None
    ids = _val_ids()[::4]
    ratios = []
    for image_id in ids:
        image, truth = dsb_image(dsb_dir, image_id), dsb_labels(dsb_dir, image_id)
        estimate = model.estimate_diameter(image)
        ratios.append(estimate / diameter(truth))
    ratios = np.array(ratios)
    assert np.mean(np.abs(np.log(ratios)) < np.log(1.3)) >= 0.8, ratios.round(2)
    image = dsb_image(dsb_dir, ids[0])
    res = model.segment(image)
    assert res.diameter == pytest.approx(model.estimate_diameter(image))
    assert np.array_equal(res.masks, model.segment(image, diameter=res.diameter).masks)


def test_auto_diameter_measures_cells_then_resizes(dsb_dir, tmp_path):
    from phenoscope.segment.flows import diameter

    model = load_model()
    image_id = min(_val_ids(), key=lambda i: diameter(dsb_labels(dsb_dir, i)) or np.inf)  # the smallest nuclei
    image, truth = dsb_image(dsb_dir, image_id), dsb_labels(dsb_dir, image_id)
    native = model.segment(image, diameter=model.cfg.diam_mean)  # resize factor 1
    auto = model.segment(image, diameter="auto")
    first = model.predict_masks(image)  # auto's first pass: native size, no estimate
    assert np.array_equal(first.masks, native.masks)
    assert auto.diameter == pytest.approx(max(diameter(native.masks), 30 / 4))
    # the shipped model's native masks on these 8 px nuclei measure 10.7 px (+30 %); a gross error is > 35 %
    assert abs(auto.diameter / diameter(truth) - 1) < 0.35, (auto.diameter, diameter(truth))
    assert np.array_equal(auto.masks, model.segment(image, diameter=auto.diameter).masks)
    with pytest.raises(ValueError, match="'auto'"):
        model.segment(image, diameter="big")
    png = tmp_path / "small.png"
    Image.fromarray(image).save(png)
    assert main(["segment", str(png), "--out", str(tmp_path / "out"), "--diameter", "auto", "--save-seg"]) == 0
    seg = np.load(tmp_path / "out" / "small_seg.npy", allow_pickle=True).item()
    assert seg["diameter"] == pytest.approx(auto.diameter)
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "small_masks.tif"), auto.masks)
    with pytest.raises(SystemExit):
        main(["segment", str(png), "--out", str(tmp_path / "out"), "--diameter", "-3"])
