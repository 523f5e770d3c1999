"""masks_to_flows and compute_masks: phenoscope vs cellpose 4.2.1.1, side by side, CPU, 2 threads.

Inputs are mosaics of real DSB 2018 label images:
  (a) 1024×1024 with about 650 objects, (b) 2048×2048 with about 2500 objects.
Network outputs are simulated as dP = 5·flows + N(0, 0.5²), cellprob = ±2 + N(0, 1).
Each timing is the best of ``--repeats`` runs, the two tools alternating; outputs are checked
for identity (flows: max abs diff; masks: same labels up to renumbering).

    python benchmarks/bench_dynamics.py [--data ../shared/data/dsb2018_train] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from phenoscope.datasets import data_root, label_mosaic  # noqa: E402
from phenoscope.testing import label_pairs  # noqa: E402
from phenoscope.segment import compute_masks, masks_to_flows  # noqa: E402
from phenoscope.testing import import_cellpose  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def same_labels(a: np.ndarray, b: np.ndarray) -> bool:
    if a.max() != b.max() or not np.array_equal(a > 0, b > 0):
        return False
    return label_pairs(a, b).shape[1] == a.max() + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=data_root() / "dsb2018_train")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cp = import_cellpose()
    cpu = torch.device("cpu")
    # compile the kernels outside the timings
    warm = label_mosaic(args.data, 256, 40)
    compute_masks(5 * masks_to_flows(warm), np.where(warm > 0, 2.0, -2.0).astype(np.float32))

    print(f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'input':<28}{'step':<26}{'cellpose s':>11}{'phenoscope s':>13}{'ratio':>8}  identical")
    for name, size, n in (("(a) 1024² ~650 objects", 1024, 650), ("(b) 2048² ~2500 objects", 2048, 2500)):
        masks = label_mosaic(args.data, size, n)
        label = f"{name} [{masks.max()}]"
        t_ref, ref = best_of(lambda: cp.dynamics.masks_to_flows_gpu(masks, device=cpu)[0], args.repeats)
        t_our, ours = best_of(lambda: masks_to_flows(masks), args.repeats)
        diff = float(np.abs(ours - ref).max())
        print(f"{label:<28}{'masks_to_flows':<26}{t_ref:>11.3f}{t_our:>13.3f}{t_ref / t_our:>7.1f}×  max|Δ|={diff:.1e}")
        rng = np.random.default_rng(0)
        dP = (5 * ours + rng.normal(0, 0.5, ours.shape)).astype(np.float32)
        cellprob = (np.where(masks > 0, 2.0, -2.0) + rng.normal(0, 1, masks.shape)).astype(np.float32)
        for qc in (0.0, 0.4):
            step = f"compute_masks {'QC 0.4' if qc else 'no QC'}"
            t_ref, ref_m = best_of(lambda: cp.dynamics.compute_masks(dP, cellprob, flow_threshold=qc, min_size=15), args.repeats)
            t_our, our_m = best_of(lambda: compute_masks(dP, cellprob, flow_threshold=qc, min_size=15), args.repeats)
            print(f"{label:<28}{step:<26}{t_ref:>11.3f}{t_our:>13.3f}{t_ref / t_our:>7.1f}×  {same_labels(ref_m, our_m)} ({our_m.max()} masks)")


if __name__ == "__main__":
    main()
