"""Forward time per 256² tile: phenoscope ``large`` vs cellpose 4.2.1.1 ``CPSAM`` (identical weights, fp32, CPU).

Also prints achieved GFLOP/s against a matmul peak measured in the same run, and the per-tile times of
the ``small`` and ``tiny`` variants. The machine may be shared: compare the ratio, not absolute times.

    python benchmarks/bench_network.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch

from phenoscope.segment.checkpoint import import_cellpose_state
from phenoscope.segment.net import NetConfig, build_net


def forward_flops(cfg: NetConfig) -> float:
    """Multiply-adds ×2 of one tile's forward pass."""
    n, d, g = cfg.grid**2, cfg.dim, cfg.grid
    hidden = int(cfg.mlp_ratio * d)
    block = 2 * n * (4 * d * d + 2 * d * hidden)  # qkv, proj, mlp
    block += 2 * 2 * n * n * d  # q·kᵀ and attn·v
    block += 2 * 2 * n * g * d  # decomposed rel-pos terms
    embed = 2 * n * d * cfg.in_chans * cfg.patch**2
    neck = 2 * n * (d * cfg.neck_dim + 9 * cfg.neck_dim**2)
    out = 2 * n * cfg.neck_dim * cfg.nout * cfg.patch**2
    return cfg.depth * block + embed + neck + out


def matmul_peak(repeats: int = 5) -> float:
    a, b = torch.randn(2048, 1024), torch.randn(1024, 4096)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * 2048 * 1024 * 4096 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_tile(fn, x: torch.Tensor, repeats: int) -> float:
    """Best-of-``repeats`` seconds per tile (after one warm-up call)."""
    with torch.inference_mode():
        fn(x)
        return min(_timed(lambda: fn(x)) for _ in range(repeats)) / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="tiles per forward call")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from phenoscope.testing import import_cellpose

    cellpose = import_cellpose()
    torch.manual_seed(0)
    ref = cellpose.vit.CPSAM().eval()  # fp32
    ours = import_cellpose_state(ref.state_dict()).eval()
    x = torch.rand(a.batch, 3, 256, 256)
    peak = matmul_peak()
    print(f"threads={a.threads}, batch={a.batch}, repeats={a.repeats}; matmul peak {peak:.1f} GFLOP/s")
    t_ref = per_tile(lambda t: ref(t)[0], x, a.repeats)
    t_ours = per_tile(ours, x, a.repeats)
    flops = forward_flops(ours.cfg)
    for name, t in (("cellpose CPSAM", t_ref), ("phenoscope large", t_ours)):
        print(f"{name:18s} {t:7.2f} s/tile  {flops / t / 1e9:6.1f} GFLOP/s ({flops / t / 1e9 / peak:.0%} of peak)")
    print(f"speed-up large vs cellpose: {t_ref / t_ours:.2f}x  (goal >= 1.5x)")
    peak = matmul_peak()
    print(f"matmul peak re-measured {peak:.1f} GFLOP/s")
    for name in ("small", "tiny"):
        net = build_net(name).eval()
        t = per_tile(net, x, a.repeats)
        print(f"phenoscope {name:7s} {t:7.3f} s/tile  {forward_flops(net.cfg) / t / 1e9:6.1f} GFLOP/s "
              f"({forward_flops(net.cfg) / 1e9:.0f} GFLOP/tile)")


if __name__ == "__main__":
    main()
