"""Whole-image flows and cellprob vs cellpose 4.2.1.1 ``CellposeModel.eval`` (fp32, CPU, identical weights).

The default run uses the real cellpose pipeline with the network cut to its first two blocks (same code
path, 12× faster); the slow test runs the full 24-block cpsam architecture on all four sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_network import random_cpsam, truncated_state

from phenoscope.datasets import dsb_image, dsb_index
from phenoscope.segment.checkpoint import import_cellpose_state, save_model
from phenoscope.segment.inference import CellposeSAM, load_model
from phenoscope.segment.net import build_net, variant
from phenoscope.segment.preprocess import to_yxc

TOL = 1e-3
RESIZE_TOL = 1e-3  # diameter resize: our torch bilinear vs cellpose's cv2 INTER_LINEAR


def dsb_canvas(root, shape: tuple[int, int]) -> np.ndarray:
    """A real DSB image tiled to ``shape`` (H, W, 3) uint8."""
    img = dsb_image(root, dsb_index(root).image_id[3])
    reps = (-(-shape[0] // img.shape[0]), -(-shape[1] // img.shape[1]), 1)
    return np.ascontiguousarray(np.tile(img, reps)[: shape[0], : shape[1]])


def cellpose_pair(folder, blocks: int):
    """(cellpose CellposeModel, our CellposeSAM) sharing random cpsam weights, cut to ``blocks`` blocks."""
    cellpose = pytest.importorskip("phenoscope.testing").import_cellpose()
    ref = random_cpsam()
    path = folder / "cpsam_random.pt"
    torch.save(ref.state_dict(), path)
    del ref
    theirs = cellpose.models.CellposeModel(pretrained_model=str(path), use_bfloat16=False)
    theirs.net.encoder.blocks = theirs.net.encoder.blocks[:blocks]
    state = torch.load(path, weights_only=True)
    ours = CellposeSAM(import_cellpose_state(truncated_state(state, blocks)), "cpu")
    return theirs, ours


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return cellpose_pair(tmp_path_factory.mktemp("cpsam"), 2)


def compare(theirs, ours, image, **kw):
    _, flows, _ = theirs.eval(image, compute_masks=False, diameter=kw.get("diameter"), augment=kw.get("tta", False),
                              channel_axis=kw.get("channel_axis"))
    got_flows, got_prob = ours.predict(image, **kw)
    assert got_flows.shape == flows[1].shape and got_prob.shape == flows[2].shape
    return np.abs(got_flows - flows[1]).max(), np.abs(got_prob - flows[2]).max()


@pytest.mark.parametrize("shape", [(200, 200), (256, 256), (700, 500)])
def test_flows_match_cellpose(pair, dsb_dir, shape):
    d_flow, d_prob = compare(*pair, dsb_canvas(dsb_dir, shape))
    print(f"{shape}: max |Δflow| {d_flow:.2e}, max |Δcellprob| {d_prob:.2e}")
    assert d_flow <= TOL and d_prob <= TOL


@pytest.mark.parametrize(
    "kw",
    [dict(tta=True), dict(diameter=45.0), dict(diameter=17.0), dict(channel_axis=0)],
    ids=["tta", "diam45", "diam17", "cyx"],
)
def test_options_match_cellpose(pair, dsb_dir, kw):
    image = dsb_canvas(dsb_dir, (300, 260))
    if kw.get("channel_axis") == 0:
        image = np.moveaxis(image, -1, 0)[:2]  # two channels, channel-first
    d_flow, d_prob = compare(*pair, image, **kw)
    assert d_flow <= RESIZE_TOL and d_prob <= RESIZE_TOL


def test_grayscale_equals_zero_padded_rgb(pair, dsb_dir):
    _, ours = pair
    gray = dsb_canvas(dsb_dir, (256, 256))[..., 0]
    rgb = np.zeros((*gray.shape, 3), np.uint8)
    rgb[..., 0] = gray
    a, b = ours.predict(gray), ours.predict(rgb)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_segment_returns_masks_and_is_batch_invariant(pair, dsb_dir):
    _, ours = pair
    image = dsb_canvas(dsb_dir, (300, 400))
    res = ours.segment(image, batch_size=3)
    assert res.masks.shape == (300, 400) and res.flows.shape == (2, 300, 400) and res.cellprob.shape == (300, 400)
    np.testing.assert_allclose(res.flows, ours.predict(image, batch_size=8)[0], atol=1e-5)


def test_load_model_roundtrip(tmp_path, dsb_dir):
    torch.manual_seed(0)
    path = save_model(build_net(variant("tiny", depth=2)), tmp_path / "tiny")
    model = load_model(path)
    image = dsb_canvas(dsb_dir, (256, 300))
    np.testing.assert_array_equal(model.predict(image)[1], load_model(path).predict(image)[1])


@pytest.mark.parametrize(
    "image,axis,msg",
    [
        (np.zeros((1, 1)), None, "1×1 px"),
        (np.zeros((64, 64, 3)), 5, "out of range"),
        (np.zeros((64, 64)), 0, "2D"),
        (np.zeros((64, 48, 3)), 0, "channel axis"),
        (np.zeros((2, 3, 64, 64)), None, "expected a 2D image"),
    ],
)
def test_bad_images_raise(image, axis, msg):
    with pytest.raises(ValueError, match=msg):
        to_yxc(image, axis)


def test_nan_image_raises(pair):
    image = np.full((64, 64), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        pair[1].predict(image)


@pytest.mark.slow
def test_full_cpsam_matches_cellpose_on_four_sizes(dsb_dir, tmp_path):
    """Acceptance: full 24-block cpsam architecture, CellposeModel vs ours (≈ 15 min on 2 cores)."""
    cellpose = pytest.importorskip("phenoscope.testing").import_cellpose()
    ref = random_cpsam()
    path = tmp_path / "cpsam_random.pt"
    torch.save(ref.state_dict(), path)
    del ref
    theirs = cellpose.models.CellposeModel(pretrained_model=str(path), use_bfloat16=False)
    ours = load_model(path, device="cpu")
    for shape in [(200, 200), (256, 256), (700, 500), (1400, 1100)]:
        d_flow, d_prob = compare(theirs, ours, dsb_canvas(dsb_dir, shape))
        print(f"full cpsam {shape}: max |Δflow| {d_flow:.2e}, max |Δcellprob| {d_prob:.2e}")
        assert d_flow <= TOL and d_prob <= TOL
