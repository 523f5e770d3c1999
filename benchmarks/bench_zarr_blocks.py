"""Huge images block by block on a dask LocalCluster against one whole-image run, side by side.

A ``--size``² mosaic of real DSB fluorescence crops (seams mid-crop, so cells straddle block borders)
is written to zarr and segmented (1) in this process by ``model.predict_masks`` on the whole image and
(2) by :func:`phenoscope.segment.blocks.segment_zarr` with ``--block`` px blocks on ``--workers``
LocalCluster workers. Prints: cells, AP@0.5 / AP@0.9 of (2) against (1), whether the labels are equal
pixel for pixel up to renumbering, the cells crossing a block border and how many of them are cut or
merged, wall times and peak RSS (this process; each worker).

    python benchmarks/bench_zarr_blocks.py --size 4096 --block 512 --workers 2
    python benchmarks/bench_zarr_blocks.py --size 20000 --block 1024 --workers 2 --no-whole   # memory only
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phenoscope.batch import DaskExecutor  # noqa: E402
from phenoscope.datasets import data_root, image_mosaic  # noqa: E402
from phenoscope.eval.segmentation import average_precision  # noqa: E402
from phenoscope.segment.blocks import segment_zarr  # noqa: E402
from phenoscope.segment.inference import load_model  # noqa: E402
from phenoscope.testing import crossing_cells, label_pairs  # noqa: E402


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _write_image(path: Path, size: int, block: int, seed: int) -> tuple[np.ndarray | None, str]:
    """The mosaic as zarr (sizes above 8192 tile a 4096² mosaic, written chunk by chunk)."""
    import zarr

    base = min(size, 4096)
    image, _ = image_mosaic(data_root() / "dsb2018_train", base, 256, seed=seed)
    z = zarr.create_array(str(path), shape=(size, size), chunks=(block, block), dtype="uint8")
    for y in range(0, size, base):
        for x in range(0, size, base):
            z[y : y + base, x : x + base] = image[: size - y, : size - x]
    return (image if size == base else None), str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--diameter", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-image run (images that do not fit)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    import torch
    from distributed import Client, LocalCluster

    torch.set_num_threads(args.workers)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_zarr_"))
    image, src = _write_image(work / "image.zarr", args.size, args.block, args.seed)
    model = load_model("default", "cpu")
    out = {"size": args.size, "block": args.block, "workers": args.workers, "diameter": args.diameter}
    ref = None
    if image is not None and not args.no_whole:
        t = time.perf_counter()
        ref = model.predict_masks(image, diameter=args.diameter).masks
        out.update(whole_s=round(time.perf_counter() - t, 1), whole_rss_gb=round(_rss_gb(), 2), whole_cells=int(ref.max()))
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40, env={"NUMBA_NUM_THREADS": "1"}) as cluster, Client(cluster) as client:
        t = time.perf_counter()
        summary = segment_zarr(src, work / "out.zarr", model, diameter=args.diameter, block=args.block,
                               executor=DaskExecutor(cluster.scheduler_address, args.workers), progress=False)
        out["blocks_s"] = round(time.perf_counter() - t, 1)
        rss = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        out["worker_rss_gb"] = [round(v, 2) for v in rss.values()]
    out.update(cells=summary.get("cells"), failed=summary["failed"], main_rss_gb=round(_rss_gb(), 2))
    if ref is not None:
        import zarr

        group = zarr.open_group(str(work / "out.zarr" / "labels" / "cells"), mode="r")
        got = group[dict(group.attrs)["ome"]["multiscales"][0]["datasets"][0]["path"]][:]
        a, *_ = average_precision([ref], [got], [0.5, 0.9])
        pairs = label_pairs(ref, got)
        n_cross, n_bad = crossing_cells(ref, got, args.block)
        out.update(ap50_vs_whole=float(a[0, 0]), ap90_vs_whole=float(a[0, 1]),
                   pixel_exact=bool(pairs.shape[1] == len(np.unique(ref)) == len(np.unique(got))),
                   crossing_cells=n_cross, crossing_cut_or_merged=n_bad)
    print(json.dumps(out, indent=1))
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
