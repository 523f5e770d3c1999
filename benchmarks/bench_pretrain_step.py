"""Cost of one CPU pretraining step, by part: data (augmentation + collate), the objective's
forward/backward/AdamW step in fp32 and under bf16 autocast, and for a CNN backbone its network in
NCHW versus channels_last memory format. Each config is built by ``phenoscope pretrain``'s own
:func:`phenoscope.ssl.pretrain.prepare_pretraining`.

    python benchmarks/bench_pretrain_step.py --threads 1 --steps 5 --bf16 \
        configs/ssl/jurkat_dino.toml experiments/jurkat_ssl/configs/cnn_byol.toml

Prints seconds per step and steps/s for each part, and the bf16 / channels_last ratios (measured in
this run; bf16 pays only on CPUs with native bf16 arithmetic: AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from phenoscope.config import load_config
from phenoscope.datasets import dataset_path
from phenoscope.nn.cnn import CellCNN
from phenoscope.ssl.pretrain import PretrainConfig, prepare_pretraining
from phenoscope.train.loop import Progress


def seconds(fn, repeats: int) -> float:
    """Mean wall time of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def bench(config: Path, data: Path, steps: int, bf16: bool) -> dict[str, float]:
    run = prepare_pretraining(load_config(PretrainConfig, config), [data])
    objective, dataset, collate = run.objective.train(), run.dataset, run.collate
    backbone = objective.backbone
    n = run.cfg.train.batch_size
    batches = iter(range(10**9))

    def data_step():
        start = next(batches) * n % (len(dataset) - n)
        return collate([dataset[i] for i in range(start, start + n)])

    batch = data_step()
    groups = objective.param_groups() if hasattr(objective, "param_groups") else [{"params": list(objective.parameters())}]
    opt = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-4)
    progress = Progress(step=0, epoch=1, steps_per_epoch=100, total_steps=1000)

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = objective(batch, progress)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(objective, "on_step_end"):
            objective.on_step_end(progress)

    out = {"data": seconds(data_step, steps), "fp32": seconds(lambda: step(False), steps)}
    if bf16:
        out["bf16"] = seconds(lambda: step(True), 1)
    if isinstance(backbone, CellCNN):  # the network alone on the batch's views, both memory formats
        x = batch["global"]

        def net_step(fmt):
            net = backbone.net.to(memory_format=fmt)
            net(x.contiguous(memory_format=fmt)).float().square().mean().backward()

        out["net NCHW"] = seconds(lambda: net_step(torch.contiguous_format), steps)
        out["net channels_last"] = seconds(lambda: net_step(torch.channels_last), steps)
        backbone.net.to(memory_format=torch.contiguous_format)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", type=Path, help="pretraining TOML configs")
    ap.add_argument("--data", type=Path, default=None, help="crops .npz (default: the shared Jurkat crops)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="also time the step under bf16 autocast (slow without native bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data or dataset_path("jurkat_cellcycle") / "jurkat_cellcycle_crops_40px.npz"
    print(f"{'config':<28}{'part':<20}{'s/step':>8}{'steps/s':>9}")
    for config in args.configs:
        torch.manual_seed(0)
        r = bench(config, data, args.steps, args.bf16)
        for part, s in r.items():
            print(f"{config.stem:<28}{part:<20}{s:>8.3f}{1 / s:>9.2f}")
        ratios = f"data/(data+fp32) {r['data'] / (r['data'] + r['fp32']):.0%}"
        if "bf16" in r:
            ratios += f", bf16/fp32 time x{r['bf16'] / r['fp32']:.2f}"
        if "net NCHW" in r:
            ratios += f", channels_last/NCHW time x{r['net channels_last'] / r['net NCHW']:.2f}"
        print(f"{config.stem:<28}{ratios}", flush=True)


if __name__ == "__main__":
    main()
