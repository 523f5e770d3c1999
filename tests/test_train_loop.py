"""The generic training loop with the SSL objectives: freezing, EMA, checkpoint/resume, logs, CLI, DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from phenoscope.ssl.augment import AugmentConfig
from phenoscope.ssl.backbone import CellViT, ViTConfig
from phenoscope.ssl.checkpoint import load_backbone
from phenoscope.ssl.data import ArraySource, MultiCropCollate, MultiCropDataset
from phenoscope.ssl.dino import DINO, DINOConfig
from phenoscope.ssl.losses import patchify
from phenoscope.ssl.mae import MAE, MAEConfig
from phenoscope.ssl.moco import MoCo, MoCoConfig
from phenoscope.ssl.simclr import SimCLR, SimCLRConfig
from phenoscope.train.loop import Progress, TrainConfig, train

AUG = AugmentConfig(global_size=32, local_size=16, n_local=2)
TINY = """
[vit]
arch = "vit_tiny"
depth = 2
patch_size = 8
img_size = 32
[augment]
global_size = 32
local_size = 16
n_local = 2
[train]
epochs = 2
batch_size = 4
warmup_epochs = 0.5
progress_bar = false
[dino]
n_prototypes = 64
head_hidden_dim = 32
head_bottleneck_dim = 16
"""


def _vit(in_chans=2):
    return CellViT(ViTConfig(arch="vit_tiny", depth=2, in_chans=in_chans, patch_size=8, img_size=32, embed_dim=48, num_heads=3))


def _dataset(n=16, c=2):
    rng = np.random.default_rng(0)
    return MultiCropDataset(ArraySource(rng.random((n, c, 40, 40), dtype=np.float32)), AUG)


def _dino():
    return DINO(_vit(), DINOConfig(n_prototypes=32, head_hidden_dim=32, head_bottleneck_dim=16))


def test_dino_loop_freeze_ema_resume(tmp_path):
    torch.manual_seed(0)
    obj = _dino()
    last0 = obj.student.dino_head.last_layer.parametrizations.weight.original1.detach().clone()
    teacher0 = obj.teacher.backbone.blocks[0].attn.qkv.weight.detach().clone()
    cfg = TrainConfig(epochs=3, batch_size=4, warmup_epochs=1, progress_bar=False, max_steps=3)
    collate = MultiCropCollate(AUG, 8)
    out = train(obj, _dataset(), cfg, tmp_path, collate_fn=collate)
    assert out["step"] == 3 and not out["finished"]
    assert obj.student.training and not obj.teacher.training  # teacher never drops paths
    assert set(out["last"]) >= {"loss", "dino", "ibot", "koleo", "lr", "wd"}
    # epoch 0: last layer frozen, teacher follows the student by EMA
    assert torch.equal(obj.student.dino_head.last_layer.parametrizations.weight.original1, last0)
    assert not torch.equal(obj.teacher.backbone.blocks[0].attn.qkv.weight, teacher0)
    assert all((tmp_path / f).exists() for f in ("checkpoint.safetensors", "trainer_state.pt", "log.csv", "loss.png"))
    # resume: a fresh objective restores the weights and continues the step count
    obj2 = _dino()
    cfg2 = TrainConfig(epochs=3, batch_size=4, warmup_epochs=1, progress_bar=False)
    out2 = train(obj2, _dataset(), cfg2, tmp_path, resume=True, collate_fn=collate)
    assert out2["finished"] and out2["step"] == 3 * 4  # epoch 0 continues where it stopped, then 2 more
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(float(r["step"])) for r in rows] == list(range(out2["step"]))
    # after epoch 1 the last layer trains
    assert not torch.equal(obj2.student.dino_head.last_layer.parametrizations.weight.original1, last0)


class _SignalAt(torch.utils.data.Dataset):
    """Sends ``sig`` to this process while the ``at``-th item (in loading order, from 1) is loaded."""

    def __init__(self, dataset, at: int, sig: int) -> None:
        self.dataset, self.at, self.sig, self.loaded = dataset, at, sig, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        self.loaded += 1
        if self.loaded == self.at:
            os.kill(os.getpid(), self.sig)
        return self.dataset[i]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_resumes(tmp_path, sig):
    import signal

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cfg = TrainConfig(epochs=2, batch_size=4, warmup_epochs=0, progress_bar=False)
    collate = MultiCropCollate(AUG, 8)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):  # the signal arrives while the 2nd batch loads
        train(_dino(), _SignalAt(_dataset(), 6, getattr(signal, sig)), cfg, tmp_path, collate_fn=collate)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 2)  # that step finished, then the loop stopped
    out = train(_dino(), _dataset(), cfg, tmp_path, resume=True, collate_fn=collate)
    assert out["finished"] and out["step"] == 2 * 4
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(float(r["step"])) for r in rows] == list(range(8))


def test_dino_sinkhorn_and_no_local_crops():
    torch.manual_seed(0)
    aug = AugmentConfig(global_size=32, n_local=0)
    obj = DINO(_vit(), DINOConfig(n_prototypes=32, head_hidden_dim=32, head_bottleneck_dim=16, centering="sinkhorn"))
    ds = MultiCropDataset(ArraySource(np.random.rand(4, 2, 40, 40).astype(np.float32)), aug)
    batch = MultiCropCollate(aug, 8)([ds[i] for i in range(4)])
    assert "local" not in batch
    out = obj(batch, Progress(0, 0, 10, 100))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and obj.student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="centering"):
        DINO(_vit(), DINOConfig(centering="none"))


def test_dino_pixel_loss_adds_masked_patch_regression():
    """``pixel_loss_weight`` adds w · MSE(head(masked student tokens), view pixels) and nothing else."""
    aug = AugmentConfig(global_size=32, n_local=0, mask_probability=1.0)
    ds = MultiCropDataset(ArraySource(np.random.default_rng(1).random((4, 2, 40, 40), dtype=np.float32)), aug)
    batch = MultiCropCollate(aug, 8)([ds[i] for i in range(4)])
    outs = {}
    for w in (0.0, 0.5):
        torch.manual_seed(0)  # same backbone and DINO head; the pixel head is built after them
        obj = DINO(_vit(), DINOConfig(n_prototypes=32, head_hidden_dim=32, head_bottleneck_dim=16, pixel_loss_weight=w))
        outs[w] = obj(batch, Progress(0, 0, 10, 100))
    assert "pixel" not in outs[0.0]
    with torch.no_grad():
        tokens = obj.student.backbone.forward_tokens(batch["global"], masks=batch["masks"])["patches"]
        err = (obj.pixel_head(tokens) - patchify(batch["global"], 8)) ** 2
        want = err.mean(-1)[batch["masks"]].mean()
    assert outs[0.5]["pixel"].item() == pytest.approx(want.item(), rel=1e-5)
    assert (outs[0.5]["loss"] - outs[0.0]["loss"]).item() == pytest.approx(0.5 * want.item(), rel=1e-4)
    outs[0.5]["loss"].backward()
    assert obj.pixel_head.weight.grad.abs().sum() > 0
    assert "pixel_head" not in obj.teacher  # student-only: no EMA copy
    optimised = {id(p) for group in obj.param_groups() for p in group["params"]}
    assert {id(p) for p in obj.pixel_head.parameters()} <= optimised
    assert not optimised & {id(p) for p in obj.teacher.parameters()}


@pytest.mark.parametrize(
    "make",
    [
        lambda: SimCLR(_vit(), SimCLRConfig(proj_hidden_dim=32, proj_dim=16)),
        lambda: MoCo(_vit(), MoCoConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)),
        lambda: MoCo(_vit(), MoCoConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, queue_size=16)),
        lambda: MAE(_vit(), MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2), 32),
    ],
    ids=["simclr", "mocov3", "mocov2-queue", "mae"],
)
def test_baselines_train_backbone(make, tmp_path):
    torch.manual_seed(0)
    obj = make()
    w0 = obj.backbone.blocks[0].mlp.fc1.weight.detach().clone()
    cfg = TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, lr=1e-3, progress_bar=False, max_steps=2)
    aug = AugmentConfig(global_size=32, n_local=0)
    ds = MultiCropDataset(ArraySource(np.random.rand(8, 2, 40, 40).astype(np.float32)), aug)
    out = train(obj, ds, cfg, tmp_path, collate_fn=MultiCropCollate(aug, 8))
    assert np.isfinite(out["last"]["loss"]) and not torch.equal(obj.backbone.blocks[0].mlp.fc1.weight, w0)
    if isinstance(obj, MoCo) and obj.cfg.queue_size:
        assert int(obj.queue_ptr) == (2 * 8) % 16


def test_cli_pretrain_bag_of_channels(tmp_path):
    from phenoscope.cli import main

    np.savez(tmp_path / "x.npz", images=np.random.default_rng(0).random((6, 3, 40, 40), dtype=np.float32))
    (tmp_path / "c.toml").write_text("bag_of_channels = true\n" + TINY)
    rc = main(["pretrain", "--method", "dino", "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "c.toml")])
    assert rc == 0
    bb = load_backbone(tmp_path / "o" / "backbone.safetensors")
    assert bb.cfg.in_chans == 1  # one model for every channel
    rows = list(csv.DictReader(open(tmp_path / "o" / "log.csv")))
    assert len(rows) == 2 * (6 * 3 // 4)  # 18 single-channel samples per epoch, batch 4
    with pytest.raises(ValueError, match="unknown option"):
        (tmp_path / "bad.toml").write_text("[train]\nepochz = 1\n")
        main(["pretrain", "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "o2"), "--config", str(tmp_path / "bad.toml"),
              "--debug"])  # without --debug: one "error:" line, exit code 2


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.random.default_rng(0).random((16, 2, 40, 40), dtype=np.float32))
    (tmp_path / "c.toml").write_text(TINY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "phenoscope", "pretrain", "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "c.toml")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(Path(tmp_path) / "o" / "log.csv")))
    assert len(rows) == 2 * (16 // (4 * 2))  # each rank sees half the data per epoch
    assert (tmp_path / "o" / "backbone.safetensors").exists()


class _DtypeProbe(torch.nn.Module):
    """A linear regression objective that records the dtype its layer computes in."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.dtypes = torch.nn.Linear(4, 1), []

    def forward(self, batch, progress):
        y = self.layer(batch)
        self.dtypes.append(y.dtype)
        return {"loss": y.float().square().mean()}


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_cpu_bf16_autocast_only_where_the_cpu_has_native_bf16(tmp_path, cpu_bf16):
    from phenoscope.train.loop import bf16_autocast, native_cpu_bf16

    cfg = TrainConfig(epochs=1, batch_size=2, warmup_epochs=0, progress_bar=False, cpu_bf16=cpu_bf16)
    probe = _DtypeProbe()
    train(probe, torch.randn(4, 4), cfg, tmp_path)
    want = torch.bfloat16 if cpu_bf16 and native_cpu_bf16() else torch.float32
    assert probe.dtypes == [want, want] and probe.layer.weight.dtype == torch.float32  # weights stay fp32
    assert bf16_autocast(TrainConfig(amp=True), torch.device("cuda")) and not bf16_autocast(TrainConfig(amp=False), torch.device("cuda"))
