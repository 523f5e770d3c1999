"""Issue 2: flows ↔ masks and metrics, compared with the real cellpose 4.2.1.1 on real DSB 2018 labels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from phenoscope.datasets import dsb_index, dsb_labels
from phenoscope.eval.segmentation import average_precision, coco_ap, error_rate
from phenoscope.segment import compute_masks, masks_to_flows
from phenoscope.testing import label_pairs

N_IMAGES = 50
FLOW_TOL = 1e-5  # max abs difference of unit flows


@pytest.fixture(scope="module")
def cellpose():
    pytest.importorskip("cellpose", reason="install the test extra: pip install -e .[test]")
    from phenoscope.testing import import_cellpose

    return import_cellpose()


@pytest.fixture(scope="module")
def real_labels(dsb_dir):
    """50 real label images up to 360² (the first such ids in sorted order), renumbered 1..N."""
    idx = dsb_index(dsb_dir)
    ids = idx.loc[idx.height * idx.width <= 360 * 360, "image_id"][:N_IMAGES]
    return [relabel_sequential(dsb_labels(dsb_dir, i).astype(np.int64))[0] for i in ids]


def net_outputs(masks: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic network outputs: dP = 5·flows + noise, cellprob = ±2 logits + noise."""
    rng = np.random.default_rng(seed)
    flows = masks_to_flows(masks)
    dP = (5 * flows + rng.normal(0, 0.5, flows.shape)).astype(np.float32)
    cellprob = (np.where(masks > 0, 2.0, -2.0) + rng.normal(0, 1, masks.shape)).astype(np.float32)
    return dP, cellprob


def test_masks_to_flows_matches_cellpose(cellpose, real_labels):
    import torch

    worst = 0.0
    for m in real_labels:
        ref = cellpose.dynamics.masks_to_flows_gpu(m, device=torch.device("cpu"))[0]
        ours = masks_to_flows(m)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst <= FLOW_TOL


@pytest.mark.parametrize("flow_threshold", [0.0, 0.4])
def test_compute_masks_identical_to_cellpose(cellpose, real_labels, flow_threshold):
    n_objects = 0
    for k, m in enumerate(real_labels):
        dP, cellprob = net_outputs(m, seed=k)
        ref = cellpose.dynamics.compute_masks(dP, cellprob, flow_threshold=flow_threshold, min_size=15)
        ours = compute_masks(dP, cellprob, flow_threshold=flow_threshold, min_size=15)
        assert ours.dtype == ref.dtype
        # same label image up to renumbering
        assert ours.max() == ref.max()
        assert np.array_equal(relabel_sequential(ours)[0] > 0, ref > 0)
        if ref.max():
            ap = average_precision([ref.astype(np.int64)], [ours.astype(np.int64)], [0.9])[0]
            assert ap[0, 0] == 1.0
            pairs = label_pairs(ref, ours)
            assert pairs.shape[1] == ref.max() + 1  # one-to-one label correspondence
        n_objects += int(ref.max())
    assert n_objects > 500  # the comparison covered real work


def test_compute_masks_torch_fallback_identical(cellpose, real_labels, monkeypatch):
    """Where the compiled 2D kernel does not reproduce the local torch's rounding, cellpose's own
    grid_sample loop runs; both paths give cellpose's masks."""
    from phenoscope.segment import dynamics

    assert dynamics._kernel_matches_torch()  # this machine runs the compiled kernel
    monkeypatch.setattr(dynamics, "_FAST_2D", False)
    for k, m in enumerate(real_labels[:4]):
        dP, cellprob = net_outputs(m, seed=k)
        ref = cellpose.dynamics.compute_masks(dP, cellprob, flow_threshold=0.4, min_size=15)
        ours = compute_masks(dP, cellprob, flow_threshold=0.4, min_size=15)
        assert ref.max() > 0
        assert average_precision([ref.astype(np.int64)], [ours.astype(np.int64)], [0.9])[0][0, 0] == 1.0


def test_average_precision_identical_to_cellpose(cellpose, real_labels):
    true, pred = [], []
    for k, m in enumerate(real_labels[:20]):
        true.append(m)
        dP, cellprob = net_outputs(m, seed=100 + k)
        pred.append(compute_masks(dP, cellprob).astype(np.int64))
        true.append(m)
        pred.append(np.where(ndi.binary_erosion(m > 0, iterations=2), m, 0))  # shrunken objects
    thresholds = [0.5, 0.75, 0.9]
    ref = cellpose.metrics.average_precision(true, pred, threshold=thresholds)
    ours = average_precision(true, pred, thresholds)
    for r, o in zip(ref, ours):
        np.testing.assert_array_equal(o, r)
    assert np.isfinite(error_rate(*ours[1:])).all()


def volume_from_labels(labels: np.ndarray, depth: int = 9) -> np.ndarray:
    """A 3D label volume from a real 2D label crop: each z-plane erodes the objects more with |z - mid|."""
    mid = depth // 2
    planes = []
    for z in range(depth):
        r = abs(z - mid)
        keep = ndi.binary_erosion(labels > 0, iterations=r) if r else labels > 0
        planes.append(np.where(keep, labels, 0))
    return relabel_sequential(np.stack(planes))[0]


@pytest.fixture(scope="module")
def volumes(real_labels):
    return [volume_from_labels(m[:96, :96]) for m in real_labels[:4]]


def test_masks_to_flows_3d_matches_cellpose(cellpose, volumes):
    import torch

    for v in volumes:
        ref = cellpose.dynamics.masks_to_flows_gpu_3d(v, device=torch.device("cpu"))
        ours = masks_to_flows(v)
        assert ours.shape == (3, *v.shape)
        assert np.abs(ours - ref).max() <= FLOW_TOL


def test_compute_masks_3d_identical_to_cellpose(cellpose, volumes):
    for k, v in enumerate(volumes):
        dP, cellprob = net_outputs(v, seed=k)
        ref = cellpose.dynamics.compute_masks(dP, cellprob, do_3D=True, min_size=15)
        ours = compute_masks(dP, cellprob, min_size=15)
        assert ref.max() > 0 and ours.max() == ref.max()
        assert average_precision([ref.astype(np.int64)], [ours.astype(np.int64)], [0.9])[0][0, 0] == 1.0


def holey_labels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Rings (hollow objects), some enclosing other objects, small specks, touching blobs."""
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, np.uint16)
    grid = np.indices(shape)
    for lab in range(1, 25):
        c = rng.uniform(0, shape[0], len(shape))
        r = np.sqrt(((grid - c.reshape(-1, *[1] * len(shape))) ** 2).sum(0))
        outer, inner = rng.uniform(3, 14), rng.uniform(0, 6)
        m[(r < outer) & (r >= inner) & (rng.random() < 0.7 or m == 0)] = lab
        if rng.random() < 0.3:  # another object inside the hole
            m[r < inner / 2] = lab + 100
    return relabel_sequential(m)[0].astype(np.uint16)


@pytest.mark.parametrize("shape", [(96, 128), (24, 40, 48)])
def test_fill_holes_identical_to_cellpose(cellpose, shape):
    from phenoscope.segment.dynamics import fill_holes_and_remove_small_masks

    for seed in range(6):
        m = holey_labels(shape, seed)
        ref = cellpose.utils.fill_holes_and_remove_small_masks(m.copy(), min_size=15)
        ours = fill_holes_and_remove_small_masks(m.copy(), min_size=15)
        assert ref.max() > 3
        np.testing.assert_array_equal(ours, ref)


def test_noncontiguous_labels_give_same_flows_as_renumbered(real_labels):
    m = real_labels[0]
    sparse = np.where(m > 0, m * 7 + 1000, 0)
    np.testing.assert_array_equal(masks_to_flows(sparse), masks_to_flows(m))


def test_flows_are_unit_inside_and_zero_outside(real_labels):
    m = real_labels[1]
    f = masks_to_flows(m)
    norm = np.sqrt((f**2).sum(0))
    assert np.allclose(norm[m > 0], 1.0, atol=1e-5)
    assert (f[:, m == 0] == 0).all()


@pytest.mark.parametrize(
    "dP, cellprob, match",
    [
        (np.full((2, 8, 8), np.nan, np.float32), np.zeros((8, 8), np.float32), "dP contains NaN"),
        (np.zeros((2, 8, 8), np.float32), np.full((8, 8), np.inf, np.float32), "cellprob contains NaN or inf"),
        (np.zeros((3, 8, 8), np.float32), np.zeros((8, 8), np.float32), "dP must have shape"),
        (np.zeros((2, 8, 9), np.float32), np.zeros((8, 8), np.float32), "dP must have shape"),
        (np.zeros((2, 8, 8), np.float32), np.zeros(8, np.float32), "cellprob must be"),
        (np.zeros((2, 8, 8), "U1"), np.zeros((8, 8), np.float32), "numeric array"),
    ],
)
def test_compute_masks_bad_input(dP, cellprob, match):
    with pytest.raises(ValueError, match=match):
        compute_masks(dP, cellprob)


def test_compute_masks_all_background():
    out = compute_masks(np.zeros((2, 16, 16), np.float32), np.full((16, 16), -5.0, np.float32))
    assert out.shape == (16, 16) and out.dtype == np.uint16 and out.max() == 0


@pytest.mark.parametrize(
    "masks, match",
    [
        (np.array([[0, -1], [1, 2]]), "negative labels"),
        (np.array([[0, 1.5], [1, 2]]), "non-integer"),
        (np.zeros((2, 2, 2, 2), np.int32), "2D .* or 3D"),
        (np.zeros((4, 4), bool), "boolean"),
        (np.zeros((4, 4), "U1"), "integer dtype"),
    ],
)
def test_masks_to_flows_bad_input(masks, match):
    with pytest.raises(ValueError, match=match):
        masks_to_flows(masks)


def test_masks_to_flows_float_integer_labels_and_empty():
    m = np.zeros((10, 10), np.float32)
    m[2:6, 2:6] = 1.0
    np.testing.assert_array_equal(masks_to_flows(m), masks_to_flows(m.astype(np.int32)))
    assert masks_to_flows(np.zeros((5, 7), np.uint16)).shape == (2, 5, 7)


def test_coco_ap_headline_uses_2000_detections():
    # 300 objects: with a 100-detection cap the headline AP would be ≈ 1/3
    labels = np.zeros((300, 300), np.int32)
    for k in range(300):
        r, c = divmod(k, 20)
        labels[r * 20 + 2 : r * 20 + 12, c * 15 + 2 : c * 15 + 12] = k + 1
    perfect = coco_ap([labels], [labels])
    assert perfect["AP"] == pytest.approx(1.0)
    assert perfect["AR@100"] == pytest.approx(1 / 3, abs=1e-3)
    half = labels.copy()
    half[half > 150] = 0
    res = coco_ap([labels], [half])
    assert res["AR@2000"] == pytest.approx(0.5, abs=1e-3)
    assert res["AP"] < 0.6


def test_classic_baseline_on_real_images(dsb_dir):
    """The classical floor segments real fluorescence and bright-field/H&E nuclei (auto inversion)."""
    from phenoscope.datasets import dsb_image
    from phenoscope.segment import segment_classic

    idx = dsb_index(dsb_dir)
    scores = {}
    for modality in ("fluorescence_gray", "color_lightbg_HE_or_brightfield"):
        ids = idx.loc[idx.modality_heuristic == modality, "image_id"][:8]
        aps = [
            average_precision([dsb_labels(dsb_dir, i).astype(np.int64)], [segment_classic(dsb_image(dsb_dir, i)).astype(np.int64)], [0.5])[0][0, 0]
            for i in ids
        ]
        scores[modality] = float(np.mean(aps))
    assert scores["fluorescence_gray"] > 0.5, scores
    assert scores["color_lightbg_HE_or_brightfield"] > 0.2, scores


def test_demo_runs_the_shipped_model(tmp_path, capsys):
    from phenoscope.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    import tifffile

    masks = tifffile.imread(tmp_path / "sample_default_masks.tif")
    assert masks.dtype == np.uint16 and masks.max() > 50  # 80 generated nuclei
    assert (tmp_path / "sample_default_overlay.png").stat().st_size > 0
    assert (tmp_path / "sample_default_cells.csv").read_text().count("\n") == masks.max() + 1
    ap = float(capsys.readouterr().out.split("default: AP@0.5 = ")[1].split()[0])
    assert ap > 0.8  # the shipped model finds the generated nuclei


def test_pairwise_sum_equals_numpy_mean():
    from phenoscope.segment.dynamics import _pairwise_sum

    rng = np.random.default_rng(0)
    for n in [*range(1, 300), 1000, 4097, 99_999]:
        x = rng.normal(0, 1, n) ** 2
        assert _pairwise_sum(x, n) / n == np.mean(x), n
