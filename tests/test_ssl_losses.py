"""Losses, teacher sharpening, heads, masking and schedules against small hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from phenoscope.ssl.heads import DINOHead
from phenoscope.ssl.losses import (
    Centering,
    dino_cls_loss,
    ibot_patch_loss,
    gather_keys,
    info_nce_loss,
    koleo_loss,
    mae_loss,
    nt_xent_loss,
    patchify,
    sinkhorn_knopp,
)
from phenoscope.ssl.masking import batch_masks, block_mask
from phenoscope.train.optim import param_groups, vit_layer_id
from phenoscope.train.schedules import cosine_schedule, ema_update, linear_warmup


def _log_softmax(v, temp):
    z = [x / temp for x in v]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def _ce(t, s, temp):
    return -sum(ti * li for ti, li in zip(t, _log_softmax(s, temp)))


def test_dino_cls_loss_hand():
    s = [[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]]  # 2 global + 1 local view, batch of 1, K=2
    t = [[0.7, 0.3], [0.2, 0.8]]
    got = dino_cls_loss([torch.tensor([v]) for v in s], [torch.tensor([v]) for v in t], student_temp=0.1)
    pairs = [(0, 1), (1, 0), (2, 0), (2, 1)]  # a view never meets itself
    want = sum(_ce(t[j], s[i], 0.1) for i, j in pairs) / len(pairs)
    assert got.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 views"):
        dino_cls_loss([torch.tensor([s[0]])], [torch.tensor([t[0]])])


def test_ibot_patch_loss_hand():
    masks = torch.tensor([[True, False, True], [False, False, False]])  # image 0: 2 masked patches; image 1: none
    s = [[1.0, -1.0], [0.0, 0.5]]
    t = [[0.9, 0.1], [0.4, 0.6]]
    got = ibot_patch_loss(torch.tensor(s), torch.tensor(t), masks, student_temp=0.1)
    want = (_ce(t[0], s[0], 0.1) + _ce(t[1], s[1], 0.1)) / 2 / 2  # per-image mean, then / B
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_koleo_hand():
    angles = [0.0, 0.5, 2.0]  # points on the unit circle
    x = torch.tensor([[math.cos(a), math.sin(a)] for a in angles]) * 3.0  # scale is normalised away
    chord = lambda d: 2 * math.sin(abs(d) / 2)  # noqa: E731
    nn = [chord(0.5), chord(0.5), chord(1.5)]
    want = -sum(math.log(d + 1e-8) for d in nn) / 3
    assert koleo_loss(x).item() == pytest.approx(want, rel=1e-5)


def test_sinkhorn_rows_and_columns():
    torch.manual_seed(0)
    logits = torch.randn(32, 8) * 3
    q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3)
    assert torch.allclose(q.sum(dim=1), torch.ones(32), atol=1e-5)  # each sample's targets sum to 1
    q_long = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=200)
    assert torch.allclose(q_long.sum(dim=0), torch.full((8,), 32 / 8), atol=1e-3)  # equipartition over prototypes
    spread = lambda a: (a.sum(0) - 4).abs().sum()  # noqa: E731
    q1 = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=3)
    assert spread(q1) < 0.7 * spread(torch.softmax(logits, dim=1))  # 3 iterations already balance prototypes
    assert torch.isfinite(sinkhorn_knopp(logits * 100, 0.04)).all()  # no overflow


def test_centering_hand():
    c = Centering(2, momentum=0.9)
    logits = torch.tensor([[1.0, 3.0], [3.0, 1.0], [2.0, 5.0]])
    probs = c(logits, 0.5)
    assert torch.allclose(probs, torch.softmax(logits / 0.5, dim=-1))
    c.update(logits)
    assert torch.allclose(c.center, torch.tensor([[0.2, 0.3]]))
    probs = c(logits, 1.0)
    assert torch.allclose(probs, torch.softmax(logits - torch.tensor([0.2, 0.3]), dim=-1))


def test_nt_xent_hand():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    z = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]]
    pos = [2, 3, 0, 1]
    total = 0.0
    for i in range(4):
        logits = [sum(a * b for a, b in zip(z[i], z[j])) / 0.5 for j in range(4) if j != i]
        others = [j for j in range(4) if j != i]
        lse = math.log(sum(math.exp(v) for v in logits))
        total += lse - logits[others.index(pos[i])]
    assert nt_xent_loss(z1, z2, 0.5).item() == pytest.approx(total / 4, rel=1e-5)


def test_info_nce_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # in-batch (v3): row 0 logits [0.6, 0]/T, row 1 [0.8, 1]/T; scaled by 2T
    T = 0.2
    ce0 = math.log(math.exp(0.6 / T) + math.exp(0.0)) - 0.6 / T
    ce1 = math.log(math.exp(0.8 / T) + math.exp(1.0 / T)) - 1.0 / T
    assert info_nce_loss(q, k, T).item() == pytest.approx((ce0 + ce1) / 2 * 2 * T, rel=1e-5)
    queue = torch.tensor([[1.0, 0.0]])  # v2: positives vs queue negatives
    ce0 = math.log(math.exp(0.6 / T) + math.exp(1.0 / T)) - 0.6 / T
    ce1 = math.log(math.exp(1.0 / T) + math.exp(0.0)) - 1.0 / T
    assert info_nce_loss(q, k, T, queue).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-5)


def _info_nce_rank(rank: int, world: int, init: str, q: torch.Tensor, k: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    n = q.shape[0] // world
    k_all, offset = gather_keys(k[rank * n : (rank + 1) * n])
    loss = info_nce_loss(q[rank * n : (rank + 1) * n], k_all, 0.2, offset=offset).reshape(1)
    dist.all_reduce(loss)
    if rank == 0:
        torch.save(loss / world, out)
    dist.destroy_process_group()


def test_info_nce_with_gathered_keys_equals_full_batch(tmp_path):
    """MoCo v3 under DDP (2 CPU processes, gloo): each rank's queries against every rank's keys
    give, averaged over ranks, the single-process loss on the whole global batch."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    out = tmp_path / "loss.pt"
    mp.spawn(_info_nce_rank, args=(2, f"file://{tmp_path / 'init'}", q, k, str(out)), nprocs=2)
    got = torch.load(out, weights_only=True).item()
    assert got == pytest.approx(info_nce_loss(q, k, 0.2).item(), rel=1e-5)
    assert got != pytest.approx(0.5 * (info_nce_loss(q[:4], k[:4], 0.2) + info_nce_loss(q[4:], k[4:], 0.2)).item(), rel=1e-3)


def test_mae_loss_and_patchify():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (1, 4, 8)
    assert p[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]  # top-right patch, (y, x, c) order
    pred = torch.zeros(1, 4, 8)
    masked = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    want = ((p[0, 0] ** 2).mean() + (p[0, 3] ** 2).mean()) / 2
    assert mae_loss(pred, p, masked, norm_pix=False).item() == pytest.approx(want.item())


def test_dino_head():
    head = DINOHead(16, n_prototypes=64, hidden_dim=32, bottleneck_dim=8)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 64)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(64), atol=1e-5)  # weight-normed prototypes, g = 1
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    assert "last_layer.parametrizations.weight.original1" in names
    assert len([m for m in head.mlp if isinstance(m, torch.nn.Linear)]) == 3
    assert DINOHead(16).last_layer.weight.shape == (65536, 256)


def test_block_mask_and_batch_ratios():
    rng = np.random.default_rng(0)
    for target in (0, 3, 10, 30, 50):
        m = block_mask((10, 10), target, rng)
        assert m.sum() <= target
    masks = batch_masks(64, (14, 14), rng, (0.1, 0.5), 0.5)
    counts = masks.sum(1)
    assert (counts > 0).sum() == 32  # half of the global crops get masks
    ratios = counts[counts > 0] / 196
    assert ratios.max() <= 0.5 and ratios.mean() > 0.2  # targets are spread over [0.1, 0.5]
    assert np.corrcoef(np.sort(ratios), np.linspace(0.1, 0.5, 32))[0, 1] > 0.95


def test_schedules_hand():
    assert cosine_schedule(0, 100, 1.0, 0.0, warmup=10) == 0.0
    assert cosine_schedule(5, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
    assert cosine_schedule(10, 100, 1.0, 0.0, warmup=10) == pytest.approx(1.0)
    assert cosine_schedule(55, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
    assert cosine_schedule(100, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.0)
    assert cosine_schedule(500, 100, 0.992, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(50, 100, 0.04, 0.4) == pytest.approx(0.22)  # weight decay half-way
    assert linear_warmup(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(40, 30, 0.04, 0.07) == pytest.approx(0.07)


def test_ema_update_hand():
    s, t = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        s.weight.fill_(1.0), s.bias.fill_(2.0), t.weight.fill_(0.0), t.bias.fill_(4.0)
    ema_update(t, s, 0.9)
    assert torch.allclose(t.weight, torch.full((1, 2), 0.1)) and torch.allclose(t.bias, torch.tensor([3.8]))


def test_layer_decay_groups():
    assert vit_layer_id("patch_embed.proj.weight", 12) == 0
    assert vit_layer_id("blocks.3.attn.qkv.weight", 12) == 4
    assert vit_layer_id("norm.weight", 12) == 13
    named = [
        ("student.backbone.patch_embed.proj.weight", torch.nn.Parameter(torch.zeros(2, 2))),
        ("student.backbone.blocks.11.mlp.fc1.weight", torch.nn.Parameter(torch.zeros(2, 2))),
        ("student.backbone.blocks.11.mlp.fc1.bias", torch.nn.Parameter(torch.zeros(2))),
        ("student.dino_head.last_layer.weight", torch.nn.Parameter(torch.zeros(2, 2))),
    ]
    groups = {n: g for g in param_groups(named, 12, 0.9, 0.2, "student.backbone.") for n in g["names"]}
    assert groups[named[0][0]]["lr_mult"] == pytest.approx(0.9**13 * 0.2)
    assert groups[named[1][0]]["lr_mult"] == pytest.approx(0.9) and groups[named[1][0]]["wd_mult"] == 1.0
    assert groups[named[2][0]]["wd_mult"] == 0.0
    assert groups[named[3][0]]["lr_mult"] == 1.0 and groups[named[3][0]]["is_last_layer"]
