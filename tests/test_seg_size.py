"""The full-resolution refinement path and the size head of the segmentation network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phenoscope.core.normalize import normalize_percentile
from phenoscope.segment.checkpoint import load_network, save_model
from phenoscope.segment.inference import CellposeSAM
from phenoscope.segment.net import build_net, grown, variant, with_refine
from phenoscope.segment.size import fit_size_head, pooled_features

SMALL = dict(depth=2, dim=32, heads=2, neck_dim=16, tile=64)


def test_refine_path_starts_from_the_network_outputs_and_trains():
    torch.manual_seed(0)
    net = build_net(variant("nano", **SMALL)).eval()
    refined = with_refine(net, 4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), refined(x))
    refined.train()
    refined(x).square().mean().backward()
    assert refined.refine.fuse[-1].weight.grad.abs().sum() > 0  # the zero-initialised layer learns
    with pytest.raises(ValueError, match="already has"):
        with_refine(refined, 4)
    with pytest.raises(ValueError, match="drop or reshape"):
        grown(net, neck_dim=8)


def test_refine_and_size_head_round_trip_through_the_checkpoint(tmp_path):
    net = grown(with_refine(build_net(variant("nano", **SMALL)), 4), size_head=True)
    save_model(net, tmp_path / "m.safetensors")
    back = load_network(tmp_path / "m.safetensors")
    assert back.cfg == net.cfg and back.cfg.skip == 4 and back.cfg.size_head
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))


def test_pooled_features_follow_the_cell_probability():
    feats = torch.zeros(1, 2, 2, 2)
    feats[0, :, 0, :] = torch.tensor([1.0, 2.0])[:, None]  # top row of tokens: cells
    feats[0, :, 1, :] = torch.tensor([-5.0, 7.0])[:, None]  # bottom row: background
    cellprob = torch.full((1, 8, 8), -30.0)
    cellprob[0, :4] = 30.0  # the top patches' pixels are cells
    pooled, mass = pooled_features(feats, cellprob, patch=4)
    assert torch.allclose(pooled, torch.tensor([[1.0, 2.0]]), atol=1e-5)
    assert mass.item() == pytest.approx(2.0, abs=1e-4)


def _discs(rng: np.random.Generator, d: float, tile: int = 64) -> np.ndarray:
    """A (3, tile, tile) image of bright discs of diameter ``d`` px in the first channel, normalised as the
    network's input is (1–99 % percentiles)."""
    yy, xx = np.mgrid[:tile, :tile]
    img = np.zeros((3, tile, tile), np.float32)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, tile, 2)
        img[0][(yy - cy) ** 2 + (xx - cx) ** 2 < (d / 2) ** 2] = 1.0
    img[0] = normalize_percentile(img[0] + 0.02 * rng.standard_normal(img[0].shape).astype(np.float32))
    return img


def test_size_head_fit_reads_the_diameter_and_the_estimate_uses_it():
    """Even a random network's pooled features separate disc sizes; the fitted head must beat the prior
    (predicting the mean log diameter) by a wide margin on held-out images."""
    torch.manual_seed(0)
    net = build_net(variant("nano", **SMALL))
    with torch.no_grad():  # every token counts as cell, so the weighting does not depend on a trained cellprob
        net.out.bias.view(3, -1)[2] = 10.0
    sizes = np.exp(np.random.default_rng(1).uniform(np.log(6), np.log(30), 40))  # one disc size per "image"
    net, fit = fit_size_head(net, lambda rng, i: (_discs(rng, sizes[i]), sizes[i]), len(sizes), tiles=384)
    assert net.cfg.size_head and fit.tiles == 384
    assert fit.rmse_log < 0.5 * np.log(sizes).std(), fit
    model = CellposeSAM(net, "cpu")
    rng = np.random.default_rng(5)
    big = np.concatenate([_discs(rng, 24.0) for _ in range(2)], axis=2)[0]  # (64, 128) image of 24 px discs
    small = np.concatenate([_discs(rng, 8.0) for _ in range(2)], axis=2)[0]
    d_big, d_small = model.estimate_diameter(big), model.estimate_diameter(small)
    assert d_big > 1.5 * d_small, (d_big, d_small)
    result = model.segment(big)
    assert result.diameter == pytest.approx(d_big)  # the default segment resizes by the estimate


def test_no_size_head_or_no_cells_means_native_size():
    torch.manual_seed(0)
    net = build_net(variant("nano", **SMALL))
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    assert CellposeSAM(net, "cpu").estimate_diameter(image) is None
    assert CellposeSAM(net, "cpu").segment(image).diameter is None
    sized = grown(net, size_head=True)
    with torch.no_grad():
        sized.out.bias.view(3, -1)[2] = -30.0  # nothing is a cell
    assert CellposeSAM(sized, "cpu").estimate_diameter(image) is None
    assert CellposeSAM(sized, "cpu").segment(image).diameter is None
