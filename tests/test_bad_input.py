"""The bad-input matrix: every case exits with its fixed code, prints one ``error:`` line naming the problem
and the file, shows no traceback and leaves no partial or wrong output. Pickled files never run their code."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from phenoscope.cli import main
from phenoscope.datasets import synthetic_nuclei

MARKER = "payload_ran"


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _nuclei(path: Path) -> Path:
    image, _ = synthetic_nuclei((96, 96), n=6, seed=1)
    tifffile.imwrite(path, image)
    return path


def _image_case(tmp: Path, name: str) -> Path:
    """One bad image file for the per-file cases of ``segment``."""
    path = tmp / {"truncated PNG": "trunc.png", "empty file": "empty.tif", "1x1": "one.tif"}.get(name, f"{name.replace(' ', '_')}.tif")
    if name == "truncated TIFF":
        good = _nuclei(tmp / "good.tif").read_bytes()
        path.write_bytes(good[: len(good) // 3])
        (tmp / "good.tif").unlink()
    elif name == "truncated PNG":
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp / "full.png")
        path.write_bytes((tmp / "full.png").read_bytes()[:60])
        (tmp / "full.png").unlink()
    elif name == "empty file":
        path.write_bytes(b"")
    elif name == "1x1":
        tifffile.imwrite(path, np.ones((1, 1), np.uint16))
    elif name == "NaN image":
        img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
        img[5, 5] = np.nan
        tifffile.imwrite(path, img)
    elif name == "Z-stack":
        tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (12, 64, 64), dtype=np.uint8))
    return path


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case,problem", [
    ("truncated TIFF", "cannot read image"),
    ("truncated PNG", "cannot read image"),
    ("empty file", "empty file"),
    ("1x1", "need at least 16×16"),
    ("NaN image", "NaN or inf"),
    ("Z-stack", "looks like a stack of 12 planes"),
])
def test_segment_reports_a_bad_image_and_goes_on(tmp_path, capsys, case, problem):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = _image_case(folder, case)
    good = _nuclei(folder / "fine.tif")
    out = tmp_path / "out"
    assert main(["segment", str(folder), "--out", str(out), "--model", "classic"]) == 1
    err = capsys.readouterr().err
    lines = _lines(err)
    assert len(lines) == 1 and bad.name in lines[0] and problem in lines[0], err
    assert "Traceback" not in err
    assert (out / f"{good.stem}_masks.tif").exists() and not list(out.glob(f"{bad.stem}_*"))  # nothing partial
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_five_channels_warn_and_segment(tmp_path, capsys):
    image, _ = synthetic_nuclei((96, 96), n=6, seed=2)
    five = np.stack([image, image[::-1], image[:, ::-1], image.T, image[::-1, ::-1]])
    tifffile.imwrite(tmp_path / "five.tif", five)
    assert main(["segment", str(tmp_path / "five.tif"), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    line = [x for x in captured.out.splitlines() if "five.tif" in x]
    assert line and "warning: image has 5 channels; the model uses the first 3" in line[0] and not _lines(captured.err)


def _expect_usage_error(capsys, argv: list[str], problem: str, named: str, out: Path | None = None) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = _lines(err)
    assert len(lines) == 1 and problem in lines[0] and named in lines[0], err
    assert "Traceback" not in err
    if out is not None:
        assert not out.exists() or not any(p for p in out.rglob("*") if p.is_file() and p.name != ".keep"), list(out.rglob("*"))


def test_model_files_that_are_not_weights(tmp_path, capsys):
    image = _nuclei(tmp_path / "cells.tif")
    (tmp_path / "random.safetensors").write_bytes(os.urandom(512))
    torch.save({"x": _Evil(tmp_path / MARKER)}, tmp_path / "evil.pt")
    for model, problem in (("random.safetensors", "corrupt or not a safetensors file"),
                           ("evil.pt", "contains non-tensor objects; refused (weights are loaded without executing code)")):
        path = str(tmp_path / model)
        _expect_usage_error(capsys, ["segment", str(image), "--out", str(tmp_path / "seg"), "--model", path], problem, model)
        _expect_usage_error(capsys, ["embed", str(image), "--out", str(tmp_path / "emb"), "--model", path], problem, model)
    assert not (tmp_path / MARKER).exists()
    assert not list((tmp_path / "seg").glob("*_masks.tif")) if (tmp_path / "seg").exists() else True


def test_missing_paths_and_unwritable_output(tmp_path, capsys):
    image = _nuclei(tmp_path / "cells.tif")
    _expect_usage_error(capsys, ["segment", str(tmp_path / "nowhere.tif"), "--out", str(tmp_path / "o")], "no such file", "nowhere.tif")
    (tmp_path / "plain_file").write_text("x")
    _expect_usage_error(capsys, ["segment", str(image), "--out", str(tmp_path / "plain_file" / "o")], "not writable", "plain_file")
    _expect_usage_error(capsys, ["embed", str(tmp_path / "nowhere.tif"), "--out", str(tmp_path / "e"), "--model", "x.safetensors"],
                        "no such file", "nowhere.tif")


def test_same_stem_pair_is_refused_before_work(tmp_path, capsys):
    _nuclei(tmp_path / "a.tif")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    _expect_usage_error(capsys, ["segment", str(tmp_path / "a.tif"), str(tmp_path / "a.png"), "--out", str(out), "--model", "classic"],
                        "share the name", "'a'", out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu(tmp_path, capsys):
    image = _nuclei(tmp_path / "cells.tif")
    _expect_usage_error(capsys, ["segment", str(image), "--out", str(tmp_path / "o"), "--device", "cuda"], "no CUDA GPU", "--device cuda")
    (tmp_path / "b.safetensors").write_bytes(b"")
    _expect_usage_error(capsys, ["embed", str(image), "--out", str(tmp_path / "e"), "--model", str(tmp_path / "b.safetensors"),
                                 "--device", "cuda"], "no CUDA GPU", "--device cuda")


def _training_pairs(tmp_path: Path, n: int = 2) -> tuple[Path, Path]:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(n):
        image, lab = synthetic_nuclei((64, 64), n=4, seed=i)
        tifffile.imwrite(images / f"im{i}.tif", image)
        tifffile.imwrite(labels / f"im{i}.tif", lab.astype(np.uint16))
    return images, labels


def test_training_labels_missing_or_mismatched(tmp_path, capsys):
    images, labels = _training_pairs(tmp_path)
    (labels / "im1.tif").unlink()
    run = ["train", "--images", str(images), "--labels", str(labels), "--model", "nano", "--epochs", "1"]
    _expect_usage_error(capsys, [*run, "--out", str(tmp_path / "r1")], "have no label file", "im1.tif", tmp_path / "r1")
    tifffile.imwrite(labels / "im1.tif", np.zeros((32, 48), np.uint16))
    _expect_usage_error(capsys, [*run, "--out", str(tmp_path / "r2")], "has shape (32, 48)", "im1", tmp_path / "r2")
    torch.save({"x": _Evil(tmp_path / MARKER)}, tmp_path / "evil.pt")
    _expect_usage_error(capsys, ["train", "--images", str(images), "--labels", str(labels), "--model", str(tmp_path / "evil.pt"),
                                 "--out", str(tmp_path / "r3")], "contains non-tensor objects; refused", "evil.pt")
    assert not (tmp_path / MARKER).exists()


def test_profile_table_without_metadata_or_matching_controls(tmp_path, capsys):
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(12, 5)), columns=[f"f{i}" for i in range(5)])
    table.to_csv(tmp_path / "nometa.csv", index=False)
    _expect_usage_error(capsys, ["profile", str(tmp_path / "nometa.csv"), "--out", str(tmp_path / "p1")], "Metadata_", "nometa.csv",
                        tmp_path / "p1")
    table = table.assign(Metadata_Plate="P1", Metadata_Well=[f"A{i:02d}" for i in range(12)], Metadata_Compound="drug",
                         Metadata_Concentration=1.0, Metadata_MoA="m")
    table.to_csv(tmp_path / "nocontrols.csv", index=False)
    _expect_usage_error(capsys, ["profile", str(tmp_path / "nocontrols.csv"), "--out", str(tmp_path / "p2")], "match", "nocontrols.csv",
                        tmp_path / "p2")
