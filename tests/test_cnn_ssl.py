"""The small-input ResNet backbone and BYOL: the CNN is a ``phenoscope.nn.Backbone`` that every
token-free SSL method trains, BYOL's loss and EMA target behave as the paper defines them, and a CNN
pretrained through ``phenoscope pretrain`` embeds through ``phenoscope embed``'s path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from phenoscope.nn import CellCNN, CNNConfig, check_backbone
from phenoscope.ssl.augment import AugmentConfig
from phenoscope.ssl.byol import byol_loss
from phenoscope.ssl.checkpoint import load_backbone_checkpoint, random_like, save_backbone
from phenoscope.ssl.data import ArraySource, MultiCropCollate, MultiCropDataset
from phenoscope.ssl.registry import get_method
from phenoscope.train.loop import Progress

HEADS = {"dino": {"n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
         "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
         "mocov3": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
         "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32}}


@pytest.mark.parametrize("arch,stride,grid", [("resnet10-half", 1, 5), ("resnet18-half", 2, 3)])
def test_cnn_is_a_backbone_with_pooled_cls_and_positional_patches(arch, stride, grid):
    torch.manual_seed(0)
    net = check_backbone(CellCNN(CNNConfig(arch, in_chans=3, stem_stride=stride))).eval()
    assert net.patch_size == 8 * stride and net.embed_dim == 256 and net.depth == 4
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out = net.forward_tokens(x)
        assert out["patches"].shape == (2, grid * grid, 256)
        torch.testing.assert_close(out["cls"], out["patches"].mean(1))
        torch.testing.assert_close(net.embed(x), out["cls"])
        # a change in one corner of the image moves the patch tokens near it more than those far from it
        y = x.clone()
        y[:, :, :8, :8] += 3
        d = (net.forward_tokens(y)["patches"] - out["patches"]).norm(dim=-1)[0]
    assert d[0] > d[-1]
    with pytest.raises(ValueError, match="a CNN backbone takes no masked tokens"):
        net.forward_tokens(x, masks=torch.ones(2, grid * grid, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\)"):
        net.forward_tokens(torch.randn(2, 4, 40, 40))
    with pytest.raises(ValueError, match="unknown CNN arch 'resnet50'"):
        CNNConfig("resnet50")


def _views(n: int = 4) -> dict[str, torch.Tensor]:
    aug = AugmentConfig(global_size=40, n_local=0, global_scale=(1.0, 1.0), mask_probability=0.0)
    ds = MultiCropDataset(ArraySource(np.random.default_rng(0).random((n, 3, 40, 40), dtype=np.float32)), aug)
    return MultiCropCollate(aug, 16)([ds[i] for i in range(n)])


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_token_free_method_trains_the_cnn(name):
    torch.manual_seed(0)
    method = get_method(name)
    net = CellCNN(CNNConfig("resnet10-half", in_chans=3, stem_stride=2))
    objective = method.build(net, method.config(**HEADS[name]), 40)
    out = objective(_views(), Progress(0, 0, 10, 100))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert net.net.conv1.weight.grad.abs().sum() > 0 and net.net.layer4[-1].bn2.weight.grad.abs().sum() > 0  # zero-initialised last BN of the residual branch
    assert net.mask_token.grad is None


def test_mae_on_a_cnn_is_refused_by_name():
    method = get_method("mae")
    with pytest.raises(ValueError, match="CellCNN does not"):
        method.build(CellCNN(CNNConfig("resnet10-half")), method.config(decoder_dim=32, decoder_depth=1, decoder_heads=2), 40)


def test_byol_loss_is_two_minus_twice_the_cosine_and_stops_the_target_gradient():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[2.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    loss = byol_loss(p, z)
    cos = torch.tensor([1.0, -1 / 2**0.5])
    torch.testing.assert_close(loss, (2 - 2 * cos).mean())
    loss.backward()
    assert z.grad is None or z.grad.abs().sum() == 0
    assert p.grad[0].abs().sum() < 1e-6 < p.grad[1].abs().sum()  # an aligned prediction has zero gradient


def test_byol_target_is_an_ema_of_the_online_network():
    torch.manual_seed(0)
    method = get_method("byol")
    net = CellCNN(CNNConfig("resnet10-half", in_chans=3, stem_stride=2))
    objective = method.build(net, method.config(**HEADS["byol"], momentum=0.9, final_momentum=0.9), 40)
    target0 = objective.target_backbone.net.conv1.weight.clone()
    assert not objective.target_backbone.net.conv1.weight.requires_grad
    torch.testing.assert_close(target0, net.net.conv1.weight.detach())  # starts as a copy
    with torch.no_grad():
        net.net.conv1.weight.add_(1.0)
    objective.on_step_end(Progress(0, 0, 1, 10))
    torch.testing.assert_close(objective.target_backbone.net.conv1.weight, 0.9 * target0 + 0.1 * net.net.conv1.weight.detach())


def test_cnn_checkpoint_round_trips_and_random_like_keeps_the_architecture(tmp_path):
    torch.manual_seed(0)
    net = CellCNN(CNNConfig("resnet10-half", in_chans=2, stem_stride=2)).eval()
    save_backbone(net, tmp_path / "cnn.safetensors")
    back, _ = load_backbone_checkpoint(tmp_path / "cnn.safetensors")
    x = torch.randn(3, 2, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(back.eval().embed(x), net.embed(x))
    rand = random_like("cnn", {"arch": "resnet10-half", "in_chans": 2, "stem_stride": 2})
    assert isinstance(rand, CellCNN) and rand.cfg == net.cfg


def test_cnn_pretrains_through_the_cli_and_embeds_through_phenoscope_embed(tmp_path):
    """``phenoscope pretrain --backbone cnn --method byol`` with the --epochs / --batch-size / --max-minutes
    flags, then ``phenoscope embed`` on the same crops: one row per crop, equal to the backbone's own features."""
    from phenoscope.cli import main
    from phenoscope.ssl.embed import normalize_input

    crops = np.random.default_rng(0).integers(0, 4000, (12, 3, 40, 40)).astype(np.uint16)
    np.savez(tmp_path / "cells.npz", images=crops)
    (tmp_path / "cfg.toml").write_text(
        '[cnn]\narch = "resnet10-half"\nstem_stride = 2\n[augment]\nglobal_size = 40\nn_local = 0\nnormalize = "dataset"\n'
        "global_scale = [1.0, 1.0]\nmask_probability = 0.0\n[train]\nepochs = 5\nwarmup_epochs = 0\nprogress_bar = false\n"
        "[byol]\nproj_hidden_dim = 32\nproj_dim = 16\npred_hidden_dim = 32\n")
    torch.manual_seed(0)
    assert main(["pretrain", "--method", "byol", "--backbone", "cnn", "--data", str(tmp_path / "cells.npz"),
                 "--out", str(tmp_path / "ssl"), "--config", str(tmp_path / "cfg.toml"), "--epochs", "1",
                 "--batch-size", "4", "--max-minutes", "30", "--threads", "1"]) == 0
    recorded = json.loads((tmp_path / "ssl" / "config.json").read_text())
    assert (recorded["train"]["epochs"], recorded["train"]["batch_size"], recorded["train"]["max_minutes"]) == (1, 4, 30)
    assert len(pd.read_csv(tmp_path / "ssl" / "log.csv")) == 3  # 12 crops / batch 4, one epoch
    model_path = tmp_path / "ssl" / "backbone.safetensors"
    assert main(["embed", str(tmp_path / "cells.npz"), "--model", str(model_path), "--out", str(tmp_path / "emb")]) == 0
    table = pd.read_parquet(tmp_path / "emb" / "embeddings.parquet")
    net, prep = load_backbone_checkpoint(model_path)
    assert isinstance(net, CellCNN) and prep.normalize == "dataset" and len(table) == 12
    with torch.no_grad():
        x = normalize_input(torch.from_numpy(crops.astype(np.float32)), "dataset", prep.channel_mean, prep.channel_std)
        direct = net.eval().embed(x).numpy()
    np.testing.assert_allclose(table[[c for c in table if c.startswith("f")]].to_numpy(), direct, rtol=1e-4, atol=1e-4)
