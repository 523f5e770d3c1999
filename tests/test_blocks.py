"""Huge images block by block (phenoscope.segment.blocks): the cells equal a whole-image run's, OME-Zarr
labels, the per-cell table, resume, bad input, and the dask executor of the batch runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

from phenoscope.batch import DaskExecutor, InputError, Item, SerialExecutor, run_batch  # noqa: E402
from phenoscope.segment.blocks import BlockLayout, bilinear_taps, resize_window, segment_zarr  # noqa: E402
from phenoscope.segment.blocks import source_span  # noqa: E402
from phenoscope.segment.preprocess import resize_chw  # noqa: E402
from phenoscope.testing import crossing_cells, label_pairs  # noqa: E402


def _write_zarr(path: Path, image: np.ndarray, chunks: int = 256) -> str:
    z = zarr.create_array(str(path), shape=image.shape, chunks=(chunks,) * image.ndim, dtype=image.dtype)
    z[:] = image
    return str(path)


def _labels(out: Path, name: str = "cells") -> np.ndarray:
    group = zarr.open_group(str(out / "labels" / name), mode="r")
    first = dict(group.attrs)["ome"]["multiscales"][0]["datasets"][0]["path"]
    return group[first][:]


def test_bilinear_window_equals_whole_resize():
    x = np.random.default_rng(0).random((2, 97, 131)).astype(np.float32)
    for ly, lx in [(61, 200), (150, 80)]:
        ty, tx = bilinear_taps(ly, 97, 5, 40), bilinear_taps(lx, 131, 7, 50)
        (a, b), (c, d) = source_span(ty), source_span(tx)
        got = resize_window(x[:, a:b, c:d], ty, tx, origin=(a, c))
        np.testing.assert_allclose(got, resize_chw(x, ly, lx)[:, 5:40, 7:50], atol=2e-6)


def test_layout_covers_the_image_once():
    layout = BlockLayout(300, 500, 128, 40)
    cover = np.zeros((300, 500), int)
    for k in range(len(layout)):
        y0, y1, x0, x1 = layout.core(k)
        cover[y0:y1, x0:x1] += 1
        wy0, wy1, wx0, wx1 = layout.window(k)
        assert wy0 == max(0, y0 - 40) and wx1 == min(500, x1 + 40)
        assert k in layout.neighbours(k) and len(layout.neighbours(k)) <= 9
    assert (cover == 1).all()


@pytest.fixture(scope="module")
def mosaic(dsb_dir):
    from phenoscope.datasets import image_mosaic

    return image_mosaic(dsb_dir, 512, 256, seed=1)


@pytest.fixture(scope="module")
def model():
    from phenoscope.segment.inference import load_model

    return load_model("default", "cpu")


@pytest.mark.parametrize("diameter", [30.0, 20.0])
def test_blocks_give_the_cells_of_the_whole_image(tmp_path, mosaic, model, diameter):
    """Blocks of 128 px on a 512² mosaic of real DSB crops (seams mid-crop): the label image equals the
    whole-image run's up to renumbering, pixel for pixel, also for cells crossing block borders; at native
    size and resized (diameter 20 px)."""
    image, _ = mosaic
    src = _write_zarr(tmp_path / "img.zarr", image)
    ref = model.predict_masks(image, diameter=diameter).masks
    summary = segment_zarr(src, tmp_path / "out.zarr", model, diameter=diameter, block=128, progress=False)
    got = _labels(tmp_path / "out.zarr")
    assert summary["failed"] == [] and summary["cells"] == ref.max() == len(np.unique(got)) - 1
    pairs = label_pairs(ref, got)
    assert pairs.shape[1] == ref.max() + 1 and (pairs[0] > 0).sum() == (pairs[1] > 0).sum() == ref.max()
    n_cross, n_bad = crossing_cells(ref, got, 128)  # cells with pixels on both sides of a block border
    assert n_cross >= 5 and n_bad == 0  # neither cut (one label) nor merged (that label has no other pixels)
    # the per-cell table: one row per cell, areas and centroids of the written labels
    import pandas as pd

    table = pd.read_parquet(summary["table"]).set_index("label")
    assert sorted(table.index) == sorted(np.unique(got)[1:].tolist())
    counts = np.bincount(got.ravel())
    assert (table["area"] == counts[table.index]).all()
    ys = np.nonzero(got)[0]
    np.testing.assert_allclose(table["centroid_y"].sort_index(),
                               np.bincount(got[got > 0], ys, counts.size)[np.unique(got)[1:]] / counts[np.unique(got)[1:]])


def test_labels_are_ome_zarr_and_the_run_resumes(tmp_path, mosaic, model):
    """The labels read back through ome-zarr-py as an image-label; a run whose blocks partly failed
    leaves nothing published, and the rerun redoes only those blocks."""
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    image = mosaic[0][:256, :384]
    src = _write_zarr(tmp_path / "img.zarr", image)

    class Flaky:  # fails on the blocks whose tiles reach the left edge, like a worker killed mid-run
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def blend(self, x, tiles, *args, origin=(0, 0)):
            if origin[1] == 0:
                raise RuntimeError("worker lost")
            return self.inner.blend(x, tiles, *args, origin=origin)

    out = tmp_path / "out.zarr"
    first = segment_zarr(src, out, Flaky(model), diameter=30, block=128, progress=False)
    failed = len(first["failed"])
    assert 0 < failed < 6 and "worker lost" in first["failed"][0] and "block 0" in first["failed"][0]
    assert not (out / "labels").exists()
    second = segment_zarr(src, out, model, diameter=30, block=128, progress=False)
    assert second["failed"] == [] and second["blocks_skipped"] == 6 - failed and second["blocks_done"] == failed
    assert not (tmp_path / "out.zarr.cells.work").exists()
    nodes = list(Reader(parse_url(str(out / "labels" / "cells")))())
    assert nodes and "image-label" in nodes[0].zarr.root_attrs.get("ome", nodes[0].zarr.root_attrs)
    ref = model.predict_masks(image, diameter=30).masks
    assert len(np.unique(_labels(out))) - 1 == ref.max()


def test_bad_input_is_refused_before_work(tmp_path, model):
    src4 = _write_zarr(tmp_path / "four.zarr", np.zeros((2, 3, 64, 64), np.uint8), 32)
    with pytest.raises(InputError, match="four.zarr.*2D image"):
        segment_zarr(src4, tmp_path / "o.zarr", model, diameter=30)
    src = _write_zarr(tmp_path / "img.zarr", np.zeros((256, 256), np.uint8))
    with pytest.raises(InputError, match="block of 40 px is smaller than 2 cell diameters"):
        segment_zarr(src, tmp_path / "o.zarr", model, diameter=30, block=40)
    with pytest.raises(InputError, match="margin of 20 px"):
        segment_zarr(src, tmp_path / "o.zarr", model, diameter=30, margin=20)
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    with pytest.raises(InputError, match="multiscales"):
        segment_zarr(str(tmp_path / "group.zarr"), tmp_path / "o.zarr", model, diameter=30)
    with pytest.raises(InputError, match="not a zarr"):
        segment_zarr(str(tmp_path / "missing.zarr"), tmp_path / "o.zarr", model, diameter=30)
    assert not (tmp_path / "o.zarr").exists()


def _upper(item: Item) -> str:
    if item.source.name == "bad":
        raise ValueError("unreadable")
    return item.source.name.upper()


def test_dask_executor_matches_serial_and_reports_failures():
    pytest.importorskip("distributed")
    items = [Item(Path(n), ()) for n in ("a", "b", "bad", "c")]
    serial = run_batch(items, _upper, SerialExecutor(), progress=False)
    dask = run_batch(items, _upper, DaskExecutor(workers=2), progress=False)
    assert dask.results == serial.results and dask.failed == serial.failed == [(Path("bad"), "unreadable")]


def test_unreachable_scheduler_is_one_clear_line(tmp_path):
    pytest.importorskip("distributed")
    with pytest.raises(InputError, match="tcp://127.0.0.1:9: cannot reach the dask scheduler"):
        list(DaskExecutor("tcp://127.0.0.1:9", timeout=1).run(_upper, [Item(Path("a"), ())]))
    img = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(img)
    run = subprocess.run([sys.executable, "-m", "phenoscope", "segment", str(img), "--out", str(tmp_path / "o"),
                          "--model", "classic", "--scheduler", "tcp://127.0.0.1:9"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: tcp://127.0.0.1:9: cannot reach")


def test_segment_files_on_a_local_cluster_equal_serial(tmp_path, dsb_dir):
    """Real images through `segment_files(..., scheduler="local")` (2 workers) give the serial run's files."""
    pytest.importorskip("distributed")
    from phenoscope.core.io import imread
    from phenoscope.datasets import dsb_index
    from phenoscope.segment.files import SegmentParams, segment_files

    ids = dsb_index(dsb_dir).query("height <= 256 and width <= 320")["image_id"].iloc[:4]
    files = [dsb_dir / "images" / f"{i}.png" for i in ids]
    params = SegmentParams(diameter=30.0)
    serial = segment_files(files, tmp_path / "serial", "default", params, progress=False)
    dask = segment_files(files, tmp_path / "dask", "default", params, workers=2, scheduler="local", progress=False)
    assert len(serial.done) == len(dask.done) == 4 and not dask.failed
    for f in files:
        assert np.array_equal(imread(tmp_path / "serial" / f"{f.stem}_masks.tif"), imread(tmp_path / "dask" / f"{f.stem}_masks.tif"))
        assert (tmp_path / "serial" / f"{f.stem}_cells.csv").read_bytes() == (tmp_path / "dask" / f"{f.stem}_cells.csv").read_bytes()


@pytest.mark.slow  # ≈ 35 s; the 4096² test runs on workers too, and segment_files covers the executor
def test_blocks_on_a_local_cluster(tmp_path, mosaic, model):
    """The same cells through dask workers (the model scattered once, labels published beside a Client)."""
    pytest.importorskip("distributed")
    image = mosaic[0][:256, :256]
    src = _write_zarr(tmp_path / "img.zarr", image)
    summary = segment_zarr(src, tmp_path / "out.zarr", model, diameter=30, block=128,
                           executor=DaskExecutor(workers=2), progress=False)
    ref = model.predict_masks(image, diameter=30).masks
    got = _labels(tmp_path / "out.zarr")
    pairs = label_pairs(ref, got)
    assert summary["failed"] == [] and pairs.shape[1] == len(np.unique(ref)) == len(np.unique(got))


@pytest.mark.slow
def test_4096_mosaic_on_two_workers_has_no_seams(tmp_path, dsb_dir, model):
    """Acceptance: a 4096² mosaic of real crops, 512 px blocks, a LocalCluster of 2 workers: the labels equal
    the whole-image run's pixel for pixel (so AP@0.9 = 1), and no cell crossing a block border is cut or
    merged (the count is printed)."""
    pytest.importorskip("distributed")
    from phenoscope.datasets import image_mosaic
    from phenoscope.eval.segmentation import average_precision

    image, _ = image_mosaic(dsb_dir, 4096, 256)
    src = _write_zarr(tmp_path / "img.zarr", image, 512)
    ref = model.predict_masks(image, diameter=30).masks
    summary = segment_zarr(src, tmp_path / "out.zarr", model, diameter=30, block=512,
                           executor=DaskExecutor(workers=2), progress=False)
    got = _labels(tmp_path / "out.zarr")
    n_cross, n_bad = crossing_cells(ref, got, 512)
    print(f"cells {ref.max()}, crossing a block border {n_cross}, cut or merged {n_bad}")
    assert summary["failed"] == [] and n_cross >= 100 and n_bad == 0
    assert average_precision([ref], [got], [0.9])[0][0, 0] == 1.0
