"""Many images on a dask cluster through the batch runner: identical outputs to a serial run, and throughput.

Segments ``--n`` real DSB images with the default model serially (this process, ``--workers`` torch
threads), then on a LocalCluster of 1 and of ``--workers`` single-threaded workers
(``segment_files(..., scheduler="local")``); prints images/s of each and whether every mask file and cell
table equals the serial run's.

    python benchmarks/bench_scheduler.py --n 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phenoscope.core.io import imread  # noqa: E402
from phenoscope.datasets import data_root, dsb_index  # noqa: E402
from phenoscope.segment.files import SegmentParams, segment_files  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = data_root() / "dsb2018_train"
    ids = dsb_index(root)["image_id"].iloc[:: max(1, 664 // args.n)][: args.n]
    files = [root / "images" / f"{i}.png" for i in ids]
    params = SegmentParams(diameter=30.0)
    out: dict = {"images": len(files)}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"serial": (1, None, args.workers), "dask_1": (1, "local", 0), f"dask_{args.workers}": (args.workers, "local", 0)}
        for name, (workers, scheduler, threads) in runs.items():
            t = time.perf_counter()
            report = segment_files(files, Path(tmp) / name, "default", params, workers=workers, threads=threads,
                                   scheduler=scheduler, progress=False)
            out[f"{name}_images_per_s"] = round(len(report.done) / (time.perf_counter() - t), 3)
            out[f"{name}_failed"] = len(report.failed)
        for name in list(runs)[1:]:
            same = all(np.array_equal(imread(Path(tmp) / "serial" / f"{f.stem}_masks.tif"), imread(Path(tmp) / name / f"{f.stem}_masks.tif"))
                       and (Path(tmp) / "serial" / f"{f.stem}_cells.csv").read_bytes() == (Path(tmp) / name / f"{f.stem}_cells.csv").read_bytes()
                       for f in files)
            out[f"{name}_identical_to_serial"] = same
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
