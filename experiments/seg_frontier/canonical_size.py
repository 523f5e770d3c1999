"""Which cell diameter should images be resized to? AP on the selection images when each image is resized
with its *true* median cell diameter (an oracle size estimate) so that cells become D px across.

    python experiments/seg_frontier/canonical_size.py --model default --sizes 17 20 24 30 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from phenoscope.datasets import data_root, dsb_image, dsb_index, dsb_labels
from phenoscope.eval.segmentation import average_precision
from phenoscope.segment import load_model
from phenoscope.segment.flows import diameter
from phenoscope.segment.training.data import read_ids

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--ids", default=str(HERE / "select_ids.txt"))
    parser.add_argument("--sizes", type=float, nargs="+", default=[17, 20, 24, 30])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = data_root() / "dsb2018_train"
    ids = sorted(read_ids(args.ids))
    groups = dsb_index(root).set_index("image_id").loc[ids, "modality_heuristic"].to_numpy()
    model = load_model(args.model)
    data = [(dsb_image(root, i), dsb_labels(root, i)) for i in ids]
    print(f"{'resize to':>10} {'AP@0.5':>7} {'AP@0.75':>7} {'AP@0.9':>7}  AP@0.5 by modality  (s)")
    for size in [None, *args.sizes]:
        t0 = time.perf_counter()
        preds = [model.segment(img, diameter=None if size is None else diameter(lab) * model.cfg.diam_mean / size).masks
                 for img, lab in data]
        ap = average_precision([lab for _, lab in data], preds, (0.5, 0.75, 0.9))[0]
        by = "  ".join(f"{g[:5]} {np.nanmean(ap[groups == g, 0]):.3f}" for g in sorted(set(groups)))
        label = "native" if size is None else f"{size:g} px"
        print(f"{label:>10} {np.nanmean(ap[:, 0]):7.3f} {np.nanmean(ap[:, 1]):7.3f} {np.nanmean(ap[:, 2]):7.3f}  {by}  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
