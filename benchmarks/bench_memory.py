"""Peak memory (RSS) of segmenting one huge 2D image on CPU with a randomly initialised network.

Runs the segmentation in a fresh subprocess and reports its peak RSS (``resource.getrusage``), after
the network pass (flows + cellprob) and after ``compute_masks``. The image is a mosaic of real DSB 2018
images (random noise if the data is absent), 3 channels uint8.

    python benchmarks/bench_memory.py --size 9600 --variant small      # acceptance: ≤ 6 GB
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from phenoscope.datasets import data_root


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def make_image(size: int):
    import numpy as np

    root = data_root() / "dsb2018_train"
    if not root.exists():
        return np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    from phenoscope.datasets import dsb_image, dsb_index

    img = dsb_image(root, dsb_index(root).image_id[3])
    reps = (-(-size // img.shape[0]), -(-size // img.shape[1]), 1)
    return np.ascontiguousarray(np.tile(img, reps)[:size, :size])


def child(size: int, variant: str, batch_size: int, threads: int, masks: bool) -> None:
    import torch

    from phenoscope.segment.inference import CellposeSAM
    from phenoscope.segment.net import build_net

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = CellposeSAM(build_net(variant), "cpu")
    image = make_image(size)
    out = {"start_gb": peak_rss_gb()}
    t0 = time.perf_counter()
    flows, cellprob = model.predict(image, batch_size=batch_size)
    out.update(network_s=time.perf_counter() - t0, after_network_gb=peak_rss_gb())
    if masks:
        from phenoscope.segment.dynamics import compute_masks

        t0 = time.perf_counter()
        labels = compute_masks(flows, cellprob)
        out.update(masks_s=time.perf_counter() - t0, after_masks_gb=peak_rss_gb(), n_masks=int(labels.max()))
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=9600)
    p.add_argument("--variant", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-masks", action="store_true", help="stop after the network pass")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.size, a.variant, a.batch_size, a.threads, not a.no_masks)
        return
    cmd = [sys.executable, __file__, "--child", "--size", str(a.size), "--variant", a.variant,
           "--batch-size", str(a.batch_size), "--threads", str(a.threads)] + ["--no-masks"] * a.no_masks
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"child failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    image_gb = a.size**2 * 3 / 1024**3
    print(f"{a.size}x{a.size}x3 uint8 image ({image_gb:.2f} GB), variant={a.variant}, batch={a.batch_size}")
    for k, v in out.items():
        print(f"  {k:18s} {v:.2f}" if isinstance(v, float) else f"  {k:18s} {v}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    print(f"peak RSS {peak:.2f} GB (goal ≤ 6 GB; cpsam paper: 18.4 GB)")


if __name__ == "__main__":
    main()
