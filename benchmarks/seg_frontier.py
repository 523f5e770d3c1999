"""Accuracy per CPU-minute: train candidate segmentation recipes under the same wall-time budget, then
score each on the model-selection images, per modality.

For each candidate TOML (a :class:`phenoscope.segment.training.SegTrainConfig`) the script

1. times a few training steps of its network at its batch size on ``--threads`` threads (augmentation included),
2. sets the epochs so that the run fills ``--budget`` minutes (the cosine / step schedule then ends on time;
   ``--max-minutes`` = 1.5 × budget stops a run that was slowed down by the machine),
3. runs ``phenoscope train`` (``--parallel`` candidates at a time, each on ``--threads`` threads), and
4. runs ``benchmarks/eval_default_model.py`` on the candidate's ``val_ids`` (the selection images).

It prints one table row per candidate: steps, tiles, tiles/s, AP@0.5/0.75/0.9 overall and AP@0.5 per
modality, and writes ``<out>/frontier.json`` and ``<out>/frontier.md``. Finished runs and evaluations are
skipped, so an interrupted frontier resumes.

    python benchmarks/seg_frontier.py experiments/seg_frontier/configs/warm_*.toml --budget 30 --threads 1 --parallel 2 --out runs/frontier
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from phenoscope.config import load_config
from phenoscope.datasets import data_root
from phenoscope.segment.training import SegTrainConfig
from phenoscope.segment.training.augment import augment_sample
from phenoscope.segment.training.data import find_pairs, read_pairs
from phenoscope.segment.training.objective import cellpose_loss
from phenoscope.segment.training.run import initial_network
from phenoscope.train.loop import CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_step(cfg: SegTrainConfig, data: Path, threads: int, steps: int = 3) -> float:
    """Wall seconds of one training step (augmenting the batch, forward, backward, AdamW) on ``threads`` threads."""
    from phenoscope.segment.flows import diameter, masks_to_flows

    torch.set_num_threads(threads)
    net = initial_network(cfg.model, cfg.init_backbone, cfg.skip).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    image, labels = read_pairs(find_pairs(data / "images", data / "labels")[:1], net.cfg)[0]
    flows, diam, rng = masks_to_flows(labels), diameter(labels), np.random.default_rng(0)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        tiles = [augment_sample(image, flows, labels > 0, diam, net.cfg.tile, rng, cfg.augment) for _ in range(cfg.train.batch_size)]
        x = torch.from_numpy(np.stack([t[0] for t in tiles]))
        y = torch.from_numpy(np.stack([t[1] for t in tiles]))
        flow, prob = cellpose_loss(net(x), y)
        (flow + prob).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def epoch_length(cfg: SegTrainConfig, data: Path) -> int:
    """Tiles per epoch: the training images left after the validation and excluded ids, at least ``min_images_per_epoch``."""
    from phenoscope.segment.training.data import split_pairs

    train, _ = split_pairs(find_pairs(data / "images", data / "labels"), cfg.val_ids, cfg.val_fraction, cfg.train.seed, cfg.exclude_ids)
    return max(len(train), cfg.min_images_per_epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=data_root() / "dsb2018_train")
    parser.add_argument("--budget", type=float, default=30.0, help="wall minutes of training per candidate")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"))
    args = parser.parse_args()
    rows, pending = {}, []
    for path in args.configs:
        name, run = path.stem, args.out / path.stem
        cfg = load_config(SegTrainConfig, path)
        if not cfg.val_ids:
            raise SystemExit(f"{path}: a frontier candidate needs val_ids (the selection images)")
        plan_file = run / "plan.json"
        if plan_file.exists():
            plan = json.loads(plan_file.read_text())
        else:
            s = seconds_per_step(cfg, args.data, args.threads)
            steps = int(args.budget * 60 / s)
            epochs = max(1, round(steps * cfg.train.batch_size / epoch_length(cfg, args.data)))
            plan = {"seconds_per_step": s, "epochs": epochs, "batch_size": cfg.train.batch_size}
            run.mkdir(parents=True, exist_ok=True)
            plan_file.write_text(json.dumps(plan))
        print(f"{name}: {plan['seconds_per_step']:.2f} s/step probed -> {plan['epochs']} epochs", flush=True)
        rows[name] = {"config": str(path), **plan}
        if not (run / "model.safetensors").exists():
            cmd = [sys.executable, "-m", "phenoscope", "train", "--images", str(args.data / "images"), "--labels",
                   str(args.data / "labels"), "--config", str(path), "--out", str(run), "--epochs", str(plan["epochs"]),
                   "--max-minutes", str(1.5 * args.budget), "--threads", str(args.threads)]
            if (run / CHECKPOINT).exists():
                cmd.append("--resume")
            pending.append((name, cmd, run))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    running: list[tuple[str, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, cmd, run = pending.pop(0)
            log = open(run / "train.log", "a")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
        time.sleep(10)
        for item in list(running):
            name, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                rows[name]["train_minutes"] = (time.time() - t0) / 60
                print(f"{name}: training ended (rc {proc.returncode}) after {rows[name]['train_minutes']:.1f} min", flush=True)
    for name, row in rows.items():
        run = args.out / name
        result = run / "select_eval.json"
        if not result.exists() and (run / "model.safetensors").exists():
            cfg = load_config(SegTrainConfig, Path(row["config"]))
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_default_model.py"), "--model", str(run / "model.safetensors"),
                            "--split", cfg.val_ids, "--data", str(args.data), "--threads", str(args.threads * args.parallel),
                            "--out", str(result)], check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads * args.parallel)})
        if result.exists():
            row["eval"] = json.loads(result.read_text())["original"]["model"]
        log = run / "log.csv"
        if log.exists():
            row["steps"] = sum(1 for _ in log.open()) - 1
    lines = ["| candidate | s/step (probe) | epochs | steps | tiles | tiles/s | AP@0.5 | AP@0.75 | AP@0.9 | AP@0.5 fluo | AP@0.5 colour | AP@0.5 gray |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        e = row.get("eval")
        if not e:
            lines.append(f"| {name} | {row['seconds_per_step']:.2f} | {row['epochs']} | – | – | – | not finished |  |  |  |  |  |")
            continue
        steps = row.get("steps", 0)
        tiles = steps * row["batch_size"]
        minutes = row.get("train_minutes")
        rate = f"{tiles / (minutes * 60):.1f}" if minutes else "–"
        by = {k: v["ap50"] for k, v in e.items()}
        lines.append(f"| {name} | {row['seconds_per_step']:.2f} | {row['epochs']} | {steps} | {tiles} | {rate} | {e['all']['ap50']:.3f} | "
                     f"{e['all']['ap75']:.3f} | {e['all']['ap90']:.3f} | {by.get('fluorescence_gray', float('nan')):.3f} | "
                     f"{by.get('color_lightbg_HE_or_brightfield', float('nan')):.3f} | {by.get('brightfield_gray', float('nan')):.3f} |")
    print("\n".join(lines))
    (args.out / "frontier.md").write_text("\n".join(lines) + "\n")
    (args.out / "frontier.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
