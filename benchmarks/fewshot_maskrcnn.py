"""CUPre with torchvision's Mask R-CNN (ResNet-50-FPN, random start) on a small real subset of the DSB
cross-domain split, end to end: MoCo of the ResNet body on unlabelled target images, source training under
L2-SP, fine-tuning on labelled target images; against fine-tuning the random detector alone. Prints COCO
AP_bbox / AP_segm (LIVECell limits) and AP@0.5 on target test images, with the CPU minutes of each run.

    python benchmarks/fewshot_maskrcnn.py --out runs/fewshot_maskrcnn [--source 8 --test 8 --epochs 2]

On a 2-core CPU one detector step (2 images of 384 × 480 px) takes ~10 s: this is a test that the path
runs, not a measurement of what CUPre buys a detector (that needs hours of source training).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phenoscope.datasets.root import data_root  # noqa: E402
from phenoscope.fewshot.maskrcnn import MaskRCNNConfig, MaskRCNNPhases, build_maskrcnn, score_maskrcnn  # noqa: E402
from phenoscope.segment.training.data import find_pairs, read_ids, read_pairs  # noqa: E402

SPLIT = Path(__file__).resolve().parents[1] / "configs" / "fewshot" / "dsb_he"


def _read(root: Path, ids: list[str]):
    from phenoscope.segment.net import variant

    net_cfg = variant("nano", merge_identical_channels=False)  # 3 percentile-normalised channels, as the flow model
    return read_pairs(find_pairs(root / "images", root / "labels", set(ids)), net_cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/fewshot_maskrcnn")
    ap.add_argument("--source", type=int, default=8, help="source (fluorescence) images")
    ap.add_argument("--pool", type=int, default=16, help="unlabelled target images for MoCo")
    ap.add_argument("--test", type=int, default=8, help="target test images scored")
    ap.add_argument("--percent", type=int, default=5, help="labelled target fraction (split file labelled_<p>pc_seed0)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of each phase")
    ap.add_argument("--min-size", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    root = data_root() / "dsb2018_train"
    ids = {name: sorted(read_ids(SPLIT / f"{name}.txt")) for name in ("source", "target_pool", "target_test")}
    source, pool = _read(root, ids["source"][: args.source]), _read(root, ids["target_pool"][: args.pool])
    labelled = _read(root, sorted(read_ids(SPLIT / f"labelled_{args.percent}pc_seed0.txt")))
    test = _read(root, ids["target_test"][: args.test])
    base = MaskRCNNConfig(min_size=args.min_size, max_size=2 * args.min_size)
    loops = {k: replace(getattr(base, k), epochs=args.epochs, progress_bar=False) for k in ("ssl_train", "source_train", "finetune_train")}
    cfg = replace(base, **loops)
    rows = []
    for name in ("scratch", "cupre"):
        t0, c0 = time.perf_counter(), time.process_time()
        phases = MaskRCNNPhases(cfg, Path(args.out) / name)
        if name == "cupre":
            model = phases.run([image for image, _ in pool], source, labelled)
        else:
            torch.manual_seed(0)
            model = build_maskrcnn(cfg)
            phases.supervised(model, labelled, "finetune", False, cfg.finetune_train)
        scores = score_maskrcnn(model, test, cfg.score_threshold)
        rows.append({"init": name, **scores, "wall_min": (time.perf_counter() - t0) / 60,
                     "cpu_min": (time.process_time() - c0) / 60})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nMask R-CNN ResNet-50-FPN, {len(source)} source / {len(pool)} pool / {len(labelled)} labelled / {len(test)} test images, "
          f"{args.epochs} epoch(s) per phase, min_size {args.min_size}")
    print(f"{'init':8} {'AP_bbox':>8} {'AP_segm':>8} {'AP50_segm':>9} {'AP@0.5':>7} {'CPU min':>8}")
    for r in rows:
        print(f"{r['init']:8} {r['coco_ap_bbox']:8.4f} {r['coco_ap_segm']:8.4f} {r['coco_ap50_segm']:9.4f} {r['ap50']:7.4f} {r['cpu_min']:8.1f}")


if __name__ == "__main__":
    main()
