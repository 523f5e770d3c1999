"""Semantic classes (phenoscope.segment.semantic): the init recipe, the weighted class loss, targets from
class images and tables, the per-mask vote, per-class metrics, checkpoints, the cell table's class column,
and training mechanics on real DSB images."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from phenoscope.core.checkpoint import Preprocessing, save_checkpoint
from phenoscope.datasets import dsb_image, dsb_index, dsb_labels, synthetic_nuclei
from phenoscope.segment.checkpoint import KIND, config_from_state, load_network, save_model
from phenoscope.segment.flows import diameter, masks_to_flows
from phenoscope.segment.inference import CellposeSAM
from phenoscope.segment.net import build_net, variant
from phenoscope.segment.outputs import cell_table
from phenoscope.segment.preprocess import padded_network_input
from phenoscope.segment.semantic import (
    class_image,
    class_loss,
    class_metrics,
    class_weights,
    segment_classes,
    target_from_class_image,
    target_from_table,
    vote_classes,
    with_classes,
)
from phenoscope.segment.training import CellposeLoss, Sample, SegAugmentConfig, SegmentationDataset

SMALL = dict(depth=2, dim=32, heads=2, neck_dim=16, tile=64)  # as in test_seg_train: fast on CPU


def _net(**changes):
    torch.manual_seed(0)
    return build_net(variant("tiny", **{**SMALL, **changes})).eval()


@pytest.mark.parametrize("changes", [{}, {"skip": 4, "size_head": True}])
def test_with_classes_initialises_from_cellprob_and_keeps_outputs(changes):
    net = _net(**changes)
    grown = with_classes(net, 2).eval()
    assert (grown.cfg.classes, grown.cfg.nout, grown.cfg.maps) == (2, 3, 6) and net.cfg.maps == 3
    p2 = net.cfg.patch**2
    w, b = net.out.weight[2 * p2 : 3 * p2], net.out.bias[2 * p2 : 3 * p2]
    for i, factor in enumerate([-0.5, 0.5, 0.5]):
        torch.testing.assert_close(grown.classify.weight[i * p2 : (i + 1) * p2], factor * w, rtol=0, atol=0)
        torch.testing.assert_close(grown.classify.bias[i * p2 : (i + 1) * p2], factor * b, rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y, y_new = net(x), grown(x)
    assert y_new.shape == (2, 6, 64, 64)
    assert torch.equal(y_new[:, :3], y)  # flows and cellprob exactly unchanged
    # the refinement path's last layer starts at zero, so the class maps are ±½ cellprob either way
    torch.testing.assert_close(y_new[:, 3], -0.5 * y[:, 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_new[:, 5], 0.5 * y[:, 2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already has 2 classes"):
        with_classes(grown, 3)
    with pytest.raises(ValueError, match="≥ 1"):
        with_classes(net, 0)


def test_class_loss_is_inverse_frequency_weighted_cross_entropy():
    logits = torch.tensor([[[[2.0, 0.0, -1.0, 0.5]], [[0.0, 1.0, 0.0, 0.5]], [[-1.0, 0.0, 3.0, 1.0]]]])  # (1, 3, 1, 4)
    target = torch.tensor([[[0, 0, 0, 1]]])  # 3 background pixels, 1 of class 1, none of class 2
    torch.testing.assert_close(class_weights(target, 3), torch.tensor([4 / (2 * 3), 4 / (2 * 1), 0.0]))

    def nll(i):
        z = logits[0, :, 0, i].tolist()
        return -(z[target[0, 0, i]] - math.log(sum(math.exp(v) for v in z)))

    # w0 = 2/3 for each background pixel, w1 = 2: (Σ w·ℓ) / (Σ w) = mean over the two present classes
    by_hand = (2 / 3 * (nll(0) + nll(1) + nll(2)) + 2 * nll(3)) / (2 / 3 * 3 + 2)
    assert math.isclose(by_hand, ((nll(0) + nll(1) + nll(2)) / 3 + nll(3)) / 2)
    assert math.isclose(class_loss(logits, target).item(), by_hand, rel_tol=1e-6)
    # explicit (e.g. training-set) weights are used as given
    plain = sum(nll(i) for i in range(4)) / 4
    assert math.isclose(class_loss(logits, target, torch.ones(3)).item(), plain, rel_tol=1e-6)


def test_vote_takes_the_majority_and_drops_background_masks():
    masks = np.zeros((4, 6), np.int32)
    masks[0, :4] = 3  # 3 of class 2, 1 of class 1 -> class 2
    masks[1, :4] = 5  # 3 background, 1 class 1 -> dropped
    masks[2, :4] = 7  # 2 class 1, 2 background: a tie goes to background -> dropped
    masks[3, :4] = 9  # all class 1
    pixel = np.array([[2, 2, 1, 2, 0, 0], [0, 0, 1, 0, 0, 0], [1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 2, 2]])
    maps = np.stack([(pixel == c).astype(np.float32) for c in range(3)])  # argmax = pixel
    kept, classes = vote_classes(masks, maps * 3.0 - 1.0)
    expected = np.zeros_like(masks)
    expected[0, :4], expected[3, :4] = 1, 2
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(classes, [2, 1])
    np.testing.assert_array_equal(class_image(kept, classes), np.where(kept == 1, 2, np.where(kept == 2, 1, 0)))
    with pytest.raises(ValueError, match="class maps"):
        vote_classes(masks, maps[:, :2])


def test_targets_from_a_class_image_and_from_a_table():
    labels = np.zeros((3, 5), np.uint16)
    labels[0, :3], labels[1:, :2], labels[1:, 3:] = 1, 4, 6
    # object 1: majority 2; object 4: majority 1 (one pixel 0); object 6: all 0 -> background
    cls = np.array([[2, 2, 1, 3, 3], [1, 1, 3, 0, 0], [1, 0, 3, 0, 0]])
    target = target_from_class_image(labels, cls)
    np.testing.assert_array_equal(target, [[2, 2, 2, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    assert target.dtype == np.int64
    from_table = target_from_table(labels, {1: 2, 4: 1, 6: 0, 99: 5})  # id 99 is not in the image: ignored
    np.testing.assert_array_equal(from_table, target)
    with pytest.raises(ValueError, match=r"1 object\(s\) have no class, e.g. labels \[6\]"):
        target_from_table(labels, {1: 2, 4: 1})
    with pytest.raises(ValueError, match="≥ 0"):
        target_from_table(labels, {1: -1, 4: 1, 6: 1})


def _square(masks, label, y, x, size=5):
    masks[y : y + size, x : x + size] = label


def test_per_class_ap_and_error_pool_counts_over_images():
    t1, p1 = np.zeros((20, 20), np.int32), np.zeros((20, 20), np.int32)
    for label, (y, x) in enumerate([(0, 0), (0, 10), (10, 0), (10, 10)], start=1):  # A, B (class 1), C, D (class 2)
        _square(t1, label, y, x)
    t1_cls = target_from_table(t1, {1: 1, 2: 1, 3: 2, 4: 2})
    _square(p1, 1, 0, 0)  # A, right class
    _square(p1, 2, 0, 10)  # B, wrong class (2)
    _square(p1, 3, 10, 0)  # C, right class; D is missed
    _square(p1, 4, 15, 15)  # a false object of class 2
    p1_cls = class_image(p1, [1, 2, 2, 2])
    t2 = np.zeros((20, 20), np.int32)
    _square(t2, 1, 5, 5)
    t2_cls = target_from_table(t2, {1: 1})  # image 2: one class-1 object, found
    m = class_metrics([t1, t2], [t1_cls, t2_cls], [p1, t2.copy()], [p1_cls, t2_cls.copy()], n_classes=3)
    np.testing.assert_array_equal(m.classes, [1, 2, 3])
    np.testing.assert_array_equal(m.n_true, [3, 2, 0])
    # class 1: TP 2 (A, image 2), FP 0, FN 1 (B); class 2: TP 1 (C), FP 2 (B, false), FN 1 (D); class 3: none
    np.testing.assert_allclose(m.ap, [2 / 3, 1 / 4, np.nan])
    np.testing.assert_allclose(m.error, [1 / 3, 3 / 2, np.nan])
    assert math.isclose(m.mean_ap, (2 / 3 + 1 / 4) / 2) and math.isclose(m.mean_error, (1 / 3 + 3 / 2) / 2)


def test_checkpoint_roundtrip_with_classes_and_old_checkpoint_loads(tmp_path):
    net = with_classes(_net(size_head=True), 2).eval()
    path = save_model(net, tmp_path / "classes")
    back = load_network(path).eval()
    assert back.cfg == net.cfg and back.cfg.classes == 2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
    assert config_from_state(net.state_dict()).classes == 2
    old = _net()
    config = {k: v for k, v in dataclasses.asdict(old.cfg).items() if k != "classes"}  # written before the field existed
    old_path = save_checkpoint(tmp_path / "old", old.state_dict(), KIND, config, Preprocessing(normalize="percentile"))
    loaded = load_network(old_path)
    assert (loaded.cfg.classes, loaded.cfg.nout, loaded.cfg.maps, loaded.classify) == (0, 3, 3, None)
    assert config_from_state(loaded.state_dict()).classes == 0


def test_class_network_segments_through_the_plain_pipeline():
    image, _ = synthetic_nuclei((96, 96), n=6, seed=1)
    model = CellposeSAM(with_classes(_net(), 2), "cpu")
    maps = model.predict_maps(image)
    flows, cellprob = model.predict(image)
    assert maps.shape == (6, 96, 96)
    np.testing.assert_array_equal(maps[:2], flows)
    np.testing.assert_array_equal(maps[2], cellprob)
    assert model.segment(image, diameter=30.0).masks.shape == (96, 96)
    masks, classes = segment_classes(model, image)
    assert masks.shape == (96, 96) and classes.shape == (masks.max(),)
    with pytest.raises(ValueError, match="no class maps"):
        segment_classes(CellposeSAM(_net(), "cpu"), image)


def test_dataset_carries_classes_with_the_same_warp():
    _, lab = synthetic_nuclei((96, 96), n=8, seed=2)
    lab = lab.astype(np.int32)
    image = np.zeros((3, 96, 96), np.float32)
    image[0] = lab > 0
    target = target_from_table(lab, {i: 1 + i % 2 for i in np.unique(lab[lab > 0])})
    plain = Sample(image, masks_to_flows(lab), lab, diameter(lab))
    classed = dataclasses.replace(plain, classes=target)
    cfg = SegAugmentConfig()
    a, b = (SegmentationDataset([s], cfg, 64, seed=3)[1] for s in (plain, classed))
    assert "classes" not in a and b["classes"].dtype == torch.int64 and b["classes"].shape == (64, 64)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])  # same draws
    assert torch.equal(b["classes"] > 0, b["target"][0] > 0.5)  # every object has a class here
    assert set(b["classes"].unique().tolist()) <= {0, 1, 2}


def test_cell_table_class_column():
    image, labels = synthetic_nuclei((64, 64), n=4, seed=0)
    n = int(labels.max())
    assert "class" not in cell_table(labels, image[..., None])
    by_row = cell_table(labels, image[..., None], classes=np.arange(n) % 2 + 1)
    np.testing.assert_array_equal(by_row["class"], np.arange(n) % 2 + 1)
    by_label = cell_table(labels, image[..., None], classes={i: 7 for i in range(1, n + 1)})
    assert (by_label["class"] == 7).all() and by_label["class"].dtype == np.int64
    with pytest.raises(ValueError, match="classes for"):
        cell_table(labels, image[..., None], classes=[1])
    with pytest.raises(ValueError, match="no class"):
        cell_table(labels, image[..., None], classes={1: 1})


def _modality_samples(root, per_modality=3):
    """Samples of the first DSB images of two modalities; every nucleus takes its image's class
    (1 = fluorescence, 2 = colour / bright-field)."""
    idx = dsb_index(root)
    picked = [(row.image_id, 1 if row.modality_heuristic.startswith("fluorescence") else 2)
              for modality in ("fluorescence_gray", "color_lightbg_HE_or_brightfield")
              for row in idx[idx.modality_heuristic == modality].head(per_modality).itertuples()]
    samples = []
    for image_id, cls in picked:
        labels = dsb_labels(root, image_id).astype(np.int32)
        image = padded_network_input(dsb_image(root, image_id), -1, 3, True)
        target = target_from_table(labels, dict.fromkeys(np.unique(labels[labels > 0]).tolist(), cls))
        samples.append(Sample(image, masks_to_flows(labels), labels, diameter(labels), classes=target))
    return picked, samples


@pytest.fixture
def one_thread():
    """One intra-op thread: these small tensors gain little from two, and when the other core is busy two
    threads wait on each other (measured: 30 steps in 3 s on one thread, 50 s on two, on a loaded 2-core CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_class_training_mechanics_on_real_images(dsb_dir, one_thread):
    torch.manual_seed(0)
    net = with_classes(build_net(variant("nano", depth=2, dim=64, heads=2, neck_dim=32)), 2).train()
    picked, samples = _modality_samples(dsb_dir)
    cfg = SegAugmentConfig(scale_range=(0.75, 1.25), p_gray=0.0, p_degrade=0.0)
    data = SegmentationDataset(samples, cfg, net.cfg.tile, seed=0)  # 8 tiles an epoch: both modalities per batch
    objective = CellposeLoss(net)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        data.set_epoch(step)
        batch = default_collate([data[(4 * step + j) % len(data)] for j in range(4)])
        out = objective(batch, SimpleNamespace(step=step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["class_loss"].item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses

    image_id, cls = picked[0]
    image, truth = dsb_image(dsb_dir, image_id), dsb_labels(dsb_dir, image_id).astype(np.int32)
    true_classes = target_from_table(truth, dict.fromkeys(np.unique(truth[truth > 0]).tolist(), cls))
    model = CellposeSAM(net.eval(), "cpu")
    masks, classes = segment_classes(model, image, channel_axis=-1)  # the whole pipeline (few masks this early)
    assert masks.shape == truth.shape and classes.shape == (masks.max(),) and set(classes.tolist()) <= {1, 2}
    assert set(np.unique(masks)) == set(range(masks.max() + 1))
    maps = model.predict_maps(image, channel_axis=-1)
    assert maps.shape == (6, *truth.shape)
    voted, voted_classes = vote_classes(truth, maps[3:])  # the vote of the predicted class maps on the true nuclei
    assert voted.max() == len(voted_classes) <= truth.max() and set(voted_classes.tolist()) <= {1, 2}
    for pred, pred_classes in ((masks, classes), (voted, voted_classes)):
        m = class_metrics([truth], [true_classes], [pred], [class_image(pred, pred_classes)], n_classes=2)
        assert m.ap.shape == m.error.shape == (2,) and m.n_true.tolist() == [len(np.unique(truth)) - 1, 0]
        assert 0.0 <= m.ap[0] <= 1.0 and m.error[0] >= 0.0 and m.mean_ap == m.ap[0] and m.mean_error == m.error[0]
    assert len(cell_table(voted, image, classes=voted_classes)) == len(voted_classes)
