"""Seconds per segmentation training step (forward, backward, AdamW) in fp32 and under bf16 autocast, on CPU.

One ``CellposeLoss`` step of a random network on random tiles and flow targets, timed both ways in the same
run, as ``train_segmentation`` does it with ``cpu_bf16`` off and on. bf16 pays only on a CPU with native bf16
(AVX512-BF16 or AMX; the script says whether this one has it); elsewhere it is emulated and much slower.

    python benchmarks/bench_seg_step.py --variant nano --batch 8 --tile 128 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from phenoscope.segment.net import build_net, variant
from phenoscope.segment.training.objective import CellposeLoss
from phenoscope.train.loop import Progress, native_cpu_bf16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="nano")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tile", type=int, default=128, help="px (training tiles of the nano recipes: 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per precision, after one warm-up")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_net(variant(args.variant, tile=args.tile))
    objective = CellposeLoss(net)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    shape = (args.batch, 1, args.tile, args.tile)
    batch = {"image": torch.randn(args.batch, net.cfg.in_chans, args.tile, args.tile),  # target: foreground, dY, dX
             "target": torch.cat([(torch.rand(shape) > 0.7).float(), torch.randn(shape), torch.randn(shape)], 1)}
    progress = Progress(step=0, epoch=0, steps_per_epoch=100, total_steps=100)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = objective(batch, progress)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {}
    for bf16 in (False, True):
        step(bf16)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(bf16)
        times[bf16] = (time.perf_counter() - t0) / args.steps
    print(f"{args.variant}, batch {args.batch} × {args.tile}², {args.threads} thread(s), native bf16: {native_cpu_bf16()}")
    print(f"fp32 {times[False]:.3f} s/step   bf16 {times[True]:.3f} s/step   fp32/bf16 x{times[False] / times[True]:.2f}")


if __name__ == "__main__":
    main()
