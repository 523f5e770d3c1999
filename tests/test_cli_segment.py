"""End-to-end ``phenoscope segment`` on real DSB 2018 images with a tiny random network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from phenoscope.batch import InputError
from phenoscope.cli import main
from phenoscope.datasets import dsb_index
from phenoscope.segment.checkpoint import save_model
from phenoscope.segment.files import MANIFEST
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
        assert list(cells.columns[:9]) == ["image", "label", "area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0",
                                           "bbox_y1", "bbox_x1"]
        assert set(cells.image) <= {png.name} and "mean_intensity_c0" in cells
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


def test_classic_model_prints_cells_and_diameter(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(images / "*.png"), "--out", str(out), "--model", "classic"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for png in sorted(images.glob("*.png")):
        n = int(tifffile.imread(out / f"{png.stem}_masks.tif").max())
        assert f"{png}: {n} cells, native scale (not resized)" in lines
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model"] == "classic" and manifest["parameters"] == {"channel_axis": None, "min_size": 15}


def test_inputs_and_output_folder_are_checked_before_any_work(images, tiny_model, tmp_path, capsys):
    """Exit code 2, one error line naming the problem, nothing written, no traceback (unless --debug)."""
    png = sorted(images.glob("*.png"))[0]
    (tmp_path / "twin").mkdir()
    shutil.copy(png, tmp_path / "twin" / f"{png.stem}.png")
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out"
    cases = {
        "missing input": ([str(images), str(tmp_path / "nothing_here")], out, "nothing_here: no such file"),
        "same stem": ([str(png), str(tmp_path / "twin")], out, f"share the name '{png.stem}'"),
        "unwritable --out": ([str(png)], tmp_path / "a_file" / "out", "output folder is not writable"),
        "missing model": ([str(png)], out, "nope.safetensors: no such file"),
        "corrupt model": ([str(png)], out, "bad.safetensors"),
    }
    (tmp_path / "bad.safetensors").write_bytes(os.urandom(256))
    for name, (inputs, folder, problem) in cases.items():
        model = {"missing model": str(tmp_path / "nope.safetensors"),
                 "corrupt model": str(tmp_path / "bad.safetensors")}.get(name, str(tiny_model))
        assert main(["segment", *inputs, "--out", str(folder), "--model", model]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0], (name, err)
        assert not list(out.glob("*_masks.tif")), name
    if not torch.cuda.is_available():
        assert main(["segment", str(png), "--out", str(out), "--model", str(tiny_model), "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(InputError):  # --debug: the exception (and its traceback) comes through
        main(["segment", str(tmp_path / "nothing_here"), "--out", str(out), "--debug"])


def md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != MANIFEST}


def test_manifest_refuses_another_model_or_parameters_unless_overwrite(images, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    run = ["segment", str(images), "--out", str(out)]
    assert main([*run, "--model", "classic"]) == 0
    before = md5s(out)
    capsys.readouterr()
    for other in (["--model", str(tiny_model)], ["--model", "classic", "--min-size", "40"]):
        assert main([*run, *other]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and MANIFEST in err[0] and "--overwrite" in err[0], err
        assert md5s(out) == before  # nothing touched
    capsys.readouterr()
    assert main([*run, "--model", "classic", "--min-size", "40", "--overwrite"]) == 0
    assert "segmented 3, skipped 0" in capsys.readouterr().err
    assert json.loads((out / MANIFEST).read_text())["parameters"]["min_size"] == 40
    fresh = tmp_path / "fresh"
    assert main(["segment", str(images), "--out", str(fresh), "--model", "classic", "--min-size", "40"]) == 0
    assert md5s(out) == md5s(fresh)  # the redone masks are those of the new parameters
    capsys.readouterr()
    assert main([*run, "--model", "classic", "--min-size", "40"]) == 0  # same run again: all skipped
    assert "skipped 3" in capsys.readouterr().err


def test_sigterm_mid_batch_exits_143_and_a_rerun_completes_identically(tmp_path):
    from phenoscope.core.io import imwrite_tiff
    from phenoscope.datasets import synthetic_nuclei

    folder = tmp_path / "in"
    n_images = 24
    for seed in range(n_images):
        imwrite_tiff(folder / f"im{seed:02d}.tif", synthetic_nuclei((256, 256), n=20, seed=seed)[0])
    reference = tmp_path / "reference"
    assert main(["segment", str(folder), "--out", str(reference), "--model", "classic"]) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "phenoscope", "segment", str(folder), "--out", str(out), "--model", "classic"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(tmp_path / "stderr.txt", "w") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, env=env)
        deadline = time.monotonic() + 120
        while not (out / "im00_cells.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    err = (tmp_path / "stderr.txt").read_text()
    assert "(interrupted); interrupted by SIGTERM" in err and "Traceback" not in err, err
    done = {name: md5 for name, md5 in md5s(out).items()}
    assert 2 <= len(done) < 2 * n_images and not [n for n in done if n.startswith(".")]  # no temp files
    assert main(["segment", str(folder), "--out", str(out), "--model", "classic"]) == 0
    after = md5s(out)
    assert after == md5s(reference)  # complete, and identical to an uninterrupted run
    assert all(after[name] == md5 for name, md5 in done.items())


def test_model_file_missing(images, tmp_path, capsys):
    assert main(["segment", str(images), "--out", str(tmp_path), "--model", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
