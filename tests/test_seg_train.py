"""Segmentation training: augmentations, cellpose loss and schedule, layer drop, resume, CLI, DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from phenoscope.core.io import imwrite_tiff
from phenoscope.datasets import synthetic_nuclei
from phenoscope.segment.checkpoint import save_model
from phenoscope.segment.flows import diameter, masks_to_flows
from phenoscope.segment.net import build_net, variant
from phenoscope.segment.training import (
    CellposeLoss,
    Sample,
    SegLoopConfig,
    SegmentationDataset,
    cellpose_loss,
    find_pairs,
    load_training_image,
)
from phenoscope.segment.training import augment as aug
from phenoscope.train.loop import train
from phenoscope.train.schedules import step_schedule

SMALL = dict(depth=2, dim=32, heads=2, neck_dim=16, tile=64)  # 8×8 tokens: seconds per epoch on CPU


def _labels(seed=0, shape=(96, 96), n=10):
    img, lab = synthetic_nuclei(shape, n=n, seed=seed)
    return img, lab.astype(np.int32)


@pytest.mark.parametrize("seed", range(4))
def test_warped_flows_match_flows_of_warped_labels(seed):
    # rotating/flipping/resizing the flow field must give the flows of the transformed labels;
    # a wrong sign or axis order makes the mean cosine negative or near zero
    _, lab = _labels(seed, (160, 160), 12)
    flows = masks_to_flows(lab)
    rng = np.random.default_rng(seed)
    a, offset, m = aug.random_affine(lab.shape, 128, rng.uniform(0.8, 1.5), rng)
    offset = np.array([80.0, 80.0]) - a @ np.array([63.5, 63.5])  # centred crop
    warped_flows = aug.rotate_flows(aug.warp(flows, a, offset, 128, order=1), m)
    warped_lab = aug.warp(lab, a, offset, 128, order=0)
    truth = masks_to_flows(warped_lab)
    inside = (warped_lab > 0) & (np.linalg.norm(truth, axis=0) > 0.5)
    cos = (warped_flows * truth).sum(0)[inside] / np.linalg.norm(warped_flows, axis=0)[inside].clip(1e-6)
    assert inside.sum() > 500 and np.median(cos) > 0.95


def test_warp_of_a_stack_with_an_empty_plane_equals_scipy_per_plane():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    stack = np.stack([rng.random((50, 60), dtype=np.float32), np.zeros((50, 60), np.float32)])
    a, offset, _ = aug.random_affine(stack.shape[1:], 32, 0.7, rng)
    out = aug.warp(stack, a, offset, 32, order=1)
    ref = np.stack([ndi.affine_transform(x, a, offset, output_shape=(32, 32), order=1, mode="constant", prefilter=False)
                    for x in stack])
    assert out.dtype == np.float32 and out.shape == (2, 32, 32)
    assert np.array_equal(out, ref) and out[0].any() and not out[1].any()


def test_random_affine_is_orthogonal_times_scale():
    a, _, m = aug.random_affine((100, 100), 64, 2.0, np.random.default_rng(0))
    np.testing.assert_allclose(m @ m.T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(a, m / 2.0)


def test_augment_sample_is_seeded_and_shaped():
    img, lab = _labels()
    image = np.stack([img / img.max(), np.zeros_like(img), np.zeros_like(img)]).astype(np.float32)
    flows = masks_to_flows(lab)
    cfg = aug.SegAugmentConfig()
    x1, t1 = aug.augment_sample(image, flows, lab > 0, diameter(lab), 64, np.random.default_rng(5), cfg)
    x2, t2 = aug.augment_sample(image, flows, lab > 0, diameter(lab), 64, np.random.default_rng(5), cfg)
    assert x1.shape == (3, 64, 64) and t1.shape == (3, 64, 64) and x1.dtype == np.float32
    assert np.array_equal(x1, x2) and np.array_equal(t1, t2)
    assert set(np.unique(t1[0])) <= {0.0, 1.0}
    assert np.abs(t1[1:]).max() <= 1.0 + 1e-5  # rotated unit flows stay unit


def test_color_augment_channels():
    x = np.zeros((3, 8, 8), np.float32)
    x[0] = np.linspace(0, 1, 64).reshape(8, 8)
    cfg = aug.SegAugmentConfig(p_gray=0, p_invert=1, p_drop_third=0, contrast=0, brightness=0, permute_channels=False)
    out = aug.color_augment(x, np.random.default_rng(0), cfg)
    np.testing.assert_allclose(out[0], 1 - x[0])
    assert not out[1:].any()  # empty channels stay empty (not inverted to 1)
    gray = aug.color_augment(x, np.random.default_rng(0), replace(cfg, p_gray=1, p_invert=0))
    np.testing.assert_allclose(gray[0], gray[2])  # gray: the mean in every channel
    for seed in range(20):  # the permuted channel keeps its content
        out = aug.color_augment(x, np.random.default_rng(seed), replace(cfg, p_invert=0, permute_channels=True))
        assert sum(c.any() for c in out) == 1


@pytest.mark.parametrize("kind", aug.DEGRADATIONS)
def test_degradations_renormalise(kind):
    img, _ = _labels()
    x = np.stack([img / img.max(), np.zeros_like(img), np.zeros_like(img)]).astype(np.float32)
    out = aug.degrade(x, np.random.default_rng(0), aug.SegAugmentConfig(), kind)
    assert out.shape == x.shape and not out[1:].any()
    assert abs(np.percentile(out[0], 1)) < 1e-3 and abs(np.percentile(out[0], 99) - 1) < 1e-3
    assert not np.allclose(out[0], aug.renormalize(x, x)[0])  # it changed the image


def test_downsample_loses_resolution():
    x = np.zeros((1, 64, 64), np.float32)
    x[0, ::2] = 1  # stripes of period 2 vanish when halved
    assert aug.downsample(x, 2.0)[0, 10:50, 10:50].std() < 0.05


def test_cellpose_loss_matches_cellpose():
    from phenoscope.testing import import_cellpose

    import_cellpose()
    from cellpose.train import _loss_fn_seg

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, 16, 16, generator=g)
    lbl = torch.cat([(torch.rand(2, 1, 16, 16, generator=g) > 0.5).float(), torch.randn(2, 2, 16, 16, generator=g)], 1)
    flow, prob = cellpose_loss(y, lbl)
    torch.testing.assert_close(flow + prob, _loss_fn_seg(lbl, y, "cpu"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("epochs", [400, 150, 60])
def test_step_schedule_matches_cellpose(epochs):
    # cellpose train_seg's per-epoch LR (10-epoch warm-up from 0, constant, then ten halvings)
    lr = np.linspace(0, 1.0, 10)
    lr = np.append(lr, np.ones(max(0, epochs - 10)))
    if epochs > 300:
        lr = lr[:-100]
        for _ in range(10):
            lr = np.append(lr, lr[-1] / 2 * np.ones(10))
    elif epochs > 99:
        lr = lr[:-50]
        for _ in range(10):
            lr = np.append(lr, lr[-1] / 2 * np.ones(5))
    ours = [step_schedule(e, 1, epochs, 1.0, warmup=9) for e in range(epochs)]
    np.testing.assert_allclose(ours, lr, rtol=1e-12)


def test_layer_drop_skips_blocks_and_zero_drop_is_plain():
    net = build_net(variant("tiny", **{**SMALL, "depth": 4})).train()
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(net(x, 0.0), net(x))
    calls = []
    for i, blk in enumerate(net.encoder.blocks):
        blk.register_forward_hook(lambda m, inp, out, i=i: calls.append((i, inp[0].shape[0])))
    net(x, 0.9, torch.Generator().manual_seed(1))
    computed = sum(n for _, n in calls)
    assert computed < 3 * 4  # skipped samples are not computed at all
    assert all(n > 0 for _, n in calls)
    net.eval()
    calls.clear()
    net(x, 0.9)  # no drop at inference
    assert sum(n for _, n in calls) == 12


def _samples(n=4, tile=64):
    out = []
    for seed in range(n):
        img, lab = _labels(seed)
        image = np.zeros((3, *img.shape), np.float32)
        image[0] = img / img.max()
        out.append(Sample(image, masks_to_flows(lab), lab, diameter(lab)))
    return out


def _run(tmp_path, max_steps=0, resume=False):
    torch.manual_seed(0)
    net = build_net(variant("tiny", **SMALL))
    cfg = SegLoopConfig(epochs=3, batch_size=2, lr=1e-3, warmup_epochs=1, progress_bar=False, max_steps=max_steps)
    objective = CellposeLoss(net, layer_drop=0.3, seed=0)
    ds = SegmentationDataset(_samples(), aug.SegAugmentConfig(), 64, seed=0, min_len=6)
    summary = train(objective, ds, cfg, tmp_path, resume=resume)
    return net, summary


def test_resume_mid_epoch_is_identical(tmp_path):
    full, s_full = _run(tmp_path / "a")
    assert s_full["finished"] and s_full["step"] == 9
    _, s_part = _run(tmp_path / "b", max_steps=4)  # stops in the middle of epoch 2
    assert not s_part["finished"] and s_part["step"] == 4
    resumed, s_res = _run(tmp_path / "b", resume=True)
    assert s_res["finished"] and s_res["step"] == 9 and s_res["steps"] == 5
    for (k, v), w in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k
    rows_a, rows_b = ([{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(tmp_path / d / "log.csv"))]
                      for d in "ab")
    assert rows_a == rows_b  # the same losses, step by step


def _write_pairs(root, n=5):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for seed in range(n):
        img, lab = _labels(seed)
        imwrite_tiff(root / "images" / f"img{seed}.tif", img)
        imwrite_tiff(root / "labels" / f"img{seed}_masks.tif", lab.astype(np.uint16))
    return root


@pytest.fixture
def start_model(tmp_path):
    torch.manual_seed(0)
    return save_model(build_net(variant("tiny", **SMALL)), tmp_path / "start")


def test_cli_train_writes_model_logs_and_split(tmp_path, start_model):
    from phenoscope.cli import main
    from phenoscope.segment import load_model

    data = _write_pairs(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--images", str(data / "images"), "--labels", str(data / "labels"), "--out", str(out),
            "--model", str(start_model), "--epochs", "2", "--batch-size", "2", "--lr", "1e-3",
            "--val-fraction", "0.4", "--val-every", "1"]
    assert main(args) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["val"]) == 2 and len(split["train"]) == 3 and not set(split["val"]) & set(split["train"])
    epochs = list(csv.DictReader(open(out / "epochs.csv")))
    assert len(epochs) == 2 and all(0 <= float(r["val_ap50"]) <= 1 for r in epochs)
    assert all((out / f).exists() for f in ("curves.png", "loss.png", "config.json"))
    assert len(list((out / "flow_cache").glob("*.npy"))) == 5
    model = load_model(out / "model.safetensors")
    assert model.segment(_labels(9)[0]).masks.shape == (96, 96)


def test_find_pairs_and_bad_labels(tmp_path):
    data = _write_pairs(tmp_path / "data", 2)
    assert [p[1].name for p in find_pairs(data / "images", data / "labels")] == ["img0_masks.tif", "img1_masks.tif"]
    imwrite_tiff(data / "images" / "extra.tif", np.zeros((32, 32), np.uint16))
    with pytest.raises(ValueError, match="no label file.*extra.tif"):
        find_pairs(data / "images", data / "labels")


def test_gray_rgb_collapses_to_one_channel(tmp_path):
    from PIL import Image

    img = (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)
    Image.fromarray(np.stack([img] * 3 + [np.full_like(img, 255)], -1)).save(tmp_path / "g.png")
    x = load_training_image(tmp_path / "g.png")
    assert x.shape == (3, 40, 40) and x[0].any() and not x[1:].any()


def test_ddp_train_two_cpu_processes(tmp_path, start_model):
    data = _write_pairs(tmp_path / "data", 6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "phenoscope", "train", "--images", str(data / "images"), "--labels", str(data / "labels"),
           "--out", str(out), "--model", str(start_model), "--epochs", "2", "--batch-size", "2",
           "--val-fraction", "0", "--val-every", "0"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert len(rows) == 2 * (8 // (2 * 2))  # 8 samples per epoch (min_images_per_epoch), 2 per rank per step
    assert (out / "model.safetensors").exists()


@pytest.mark.slow  # ≈ 65 s: fine-tunes a full cpsam-shaped network
def test_finetune_from_a_cellpose_checkpoint_with_the_paper_recipe(tmp_path):
    from phenoscope.cli import main
    from phenoscope.segment import load_model

    torch.manual_seed(0)
    net = build_net(variant("large", depth=1, dim=32, heads=2, neck_dim=16, rel_pos_rows=()))
    state = dict(net.state_dict())  # cellpose's CPSAM names, plus its fixed readout and diameters
    state["W2"] = torch.eye(192).reshape(192, 3, 8, 8)
    state["diam_mean"], state["diam_labels"] = torch.tensor([30.0]), torch.tensor([30.0])
    torch.save(state, tmp_path / "cpsam_tiny.pt")
    data = _write_pairs(tmp_path / "data", 3)
    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "segment", "finetune_cpsam.toml")
    out = tmp_path / "ft"
    assert main(["train", "--images", str(data / "images"), "--labels", str(data / "labels"), "--out", str(out),
                 "--model", str(tmp_path / "cpsam_tiny.pt"), "--config", recipe, "--epochs", "2"]) == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert len(rows) == 2 * 8  # batch 1, 3 images repeated to 8 per epoch
    assert float(rows[-1]["lr"]) <= 1e-5
    tuned = load_model(out / "model.safetensors")
    assert not tuned.cfg.merge_identical_channels  # keeps cellpose's input convention
    assert not torch.equal(tuned.net.out.weight, net.out.weight)


def test_gray_rgb_and_single_channel_give_the_same_input():
    from phenoscope.segment.inference import CellposeSAM

    model = CellposeSAM(build_net(variant("tiny", **SMALL)), "cpu")
    img, _ = _labels()
    f1, c1 = model.predict(img)
    f3, c3 = model.predict(np.stack([img] * 3, -1))
    assert np.array_equal(f1, f3) and np.array_equal(c1, c3)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, start_model):
    import signal
    import time

    data = _write_pairs(tmp_path / "data", 4)
    out = tmp_path / "run"
    args = ["-m", "phenoscope", "train", "--images", str(data / "images"), "--labels", str(data / "labels"),
            "--out", str(out), "--model", str(start_model), "--epochs", "400", "--batch-size", "1",
            "--val-fraction", "0", "--val-every", "0", "--threads", "1"]
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file, not a pipe that nobody reads while we wait
        proc = subprocess.Popen([sys.executable, *args], stderr=stderr)
        deadline = time.monotonic() + 120
        while not (out / "log.csv").exists() or len((out / "log.csv").read_text().splitlines()) < 12:
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 130 and "checkpoint saved" in (tmp_path / "stderr.txt").read_text()
    done = torch.load(out / "trainer_state.pt", weights_only=True)
    assert 0 < done["step"] < 400 * 8
    args[args.index("400")] = str(done["epoch"] + 1)  # finish the interrupted epoch
    res = subprocess.run([sys.executable, *args, "--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(float(r["step"])) for r in rows] == list(range((done["epoch"] + 1) * 8))  # no step lost or repeated


def test_volumes_train_through_their_planes(tmp_path, dsb_dir):
    """A (Z, Y, X) label volume beside its image volume gives one training pair per YX, ZY and ZX plane
    that holds cells, normalised over the volume (as 3D inference sees it), objects split by connectivity."""
    from phenoscope.datasets import dsb_image, dsb_index, dsb_labels
    from phenoscope.segment.training.data import read_pairs
    from phenoscope.segment.volume import volume_input

    image_id = dsb_index(dsb_dir).query("height == 256 and width == 256")["image_id"].iloc[0]
    img, lab = dsb_image(dsb_dir, image_id)[:64, :48, 0], dsb_labels(dsb_dir, image_id)[:64, :48]
    vol = np.stack([np.roll(img, z, 1) for z in range(20)])
    labels = np.stack([np.roll(lab, z, 1) for z in range(20)])
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    imwrite_tiff(tmp_path / "images" / "vol.tif", vol)
    imwrite_tiff(tmp_path / "labels" / "vol_masks.tif", labels)
    cfg = variant("nano")
    read = read_pairs(find_pairs(tmp_path / "images", tmp_path / "labels"), cfg)
    shapes = {p[0].shape for p in read}
    assert shapes <= {(3, 64, 48), (3, 20, 48), (3, 20, 64)} and len(shapes) == 3
    expected = 20 + sum(labels[:, y].any() for y in range(64)) + sum(labels[:, :, x].any() for x in range(48))
    assert len(read) == expected
    x = volume_input(vol, 0, None, 3, cfg.merge_identical_channels)
    np.testing.assert_array_equal(read[0][0][: x.shape[0]], x[:, 0])
    assert all(len(np.unique(p[1])) - 1 == p[1].max() for p in read)  # labels 1..n per plane
    imwrite_tiff(tmp_path / "labels" / "vol_masks.tif", labels[:, :-1])
    with pytest.raises(ValueError, match="label volume has shape"):
        read_pairs(find_pairs(tmp_path / "images", tmp_path / "labels"), cfg)
