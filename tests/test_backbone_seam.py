"""The backbone seam: the SSL ViT and every Cellpose-SAM encoder are ``phenoscope.nn.Backbone``s, every
registered SSL method trains either, and a MoCo v3-pretrained segmentation encoder starts ``phenoscope train``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from phenoscope.core.checkpoint import read_checkpoint, save_checkpoint
from phenoscope.core.io import imwrite_tiff
from phenoscope.datasets import synthetic_nuclei
from phenoscope.nn import Backbone, check_backbone
from phenoscope.segment.checkpoint import load_encoder_into, save_encoder, save_model
from phenoscope.segment.net import VARIANTS, CellposeSAMNet, Encoder, build_net, variant
from phenoscope.ssl.augment import AugmentConfig
from phenoscope.ssl.backbone import CellViT, ViTConfig
from phenoscope.ssl.data import ArraySource, MultiCropCollate, MultiCropDataset
from phenoscope.ssl.registry import Method, get_method, methods, register
from phenoscope.train.loop import Progress

TINY_HEADS = {"dino": {"n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
              "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
              "mocov3": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
              "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
              "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32}}


def json_form(cfg) -> dict:
    """A NetConfig as its checkpoint stores it (JSON: tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _check_shapes(bb: Backbone, size: int) -> None:
    """One forward of the same image twice, masked in full (sample 0) and not at all (sample 1)."""
    x = torch.randn(1, bb.in_chans, size, size).expand(2, -1, -1, -1)
    n = (size // bb.patch_size) ** 2
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[0] = True
    with torch.no_grad():
        out = bb.forward_tokens(x, masks=masks)
    assert out["cls"].shape == (2, bb.embed_dim) and out["patches"].shape == (2, n, bb.embed_dim)
    assert not torch.allclose(out["patches"][0], out["patches"][1])
    assert bb.mask_token.ndim == 2 and bb.depth >= 1


def test_cellvit_is_a_backbone():
    vit = CellViT(ViTConfig(arch="vit_tiny", depth=2, in_chans=2, patch_size=8, img_size=32))
    assert isinstance(vit, Backbone) and check_backbone(vit) is vit
    assert (vit.embed_dim, vit.patch_size, vit.in_chans, vit.depth) == (192, 8, 2, 2)
    _check_shapes(vit, 32)
    x = torch.randn(2, 2, 32, 32)
    assert torch.equal(vit(x), vit.forward_tokens(x)["cls"])  # what the objectives read instead of vit(x)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_segmentation_encoder_is_a_backbone(name):
    torch.manual_seed(0)
    cfg = variant(name)
    enc = Encoder(cfg, mask_token=True)
    assert isinstance(enc, Backbone)
    assert (enc.embed_dim, enc.patch_size, enc.in_chans, enc.depth) == (cfg.neck_dim, cfg.patch, cfg.in_chans, cfg.depth)
    _check_shapes(enc, 64)  # 8×8 tokens, the position grid resized: cheap even for large
    with pytest.raises(TypeError, match="lacks"):
        check_backbone(torch.nn.Linear(2, 2))


def test_encoder_tokens_are_the_network_features_and_masks_act_before_positions():
    torch.manual_seed(0)
    cfg = variant("nano", depth=2)
    enc = Encoder(cfg, mask_token=True)
    with torch.no_grad():
        enc.pos_embed.normal_()
        enc.mask_token.normal_()
        x = torch.randn(2, 3, cfg.tile, cfg.tile)
        feats = enc(x)  # (B, neck_dim, grid, grid): what the segmentation readout reads
        tokens = enc.forward_tokens(x)
        assert torch.equal(tokens["patches"], feats.flatten(2).transpose(1, 2))
        assert torch.allclose(tokens["cls"], feats.mean(dim=(2, 3)), atol=1e-6)
        masks = torch.zeros(2, cfg.grid**2, dtype=torch.bool)
        masks[0, 5] = masks[1, 0] = True
        t = enc.input_tokens(x, masks).reshape(2, -1, cfg.dim)
        plain = enc.input_tokens(x).reshape(2, -1, cfg.dim)
        pos = enc.pos_embed.reshape(-1, cfg.dim)
        assert torch.allclose(t[0, 5], enc.mask_token[0] + pos[5]) and torch.allclose(t[1, 0], enc.mask_token[0] + pos[0])
        assert torch.equal(t[~masks], plain[~masks])
    # the segmentation network's encoder has no mask token: cpsam / saved state dicts keep their keys
    assert not any("mask_token" in k for k in build_net("nano").state_dict())
    with pytest.raises(ValueError, match="without a mask token"):
        build_net("nano").encoder.forward_tokens(x, masks)


def test_registry_lists_every_method_and_rejects_clashes():
    from phenoscope.ssl.pretrain import PretrainConfig

    known = methods()
    assert set(known) >= {"dino", "simclr", "mae", "mocov3", "byol"}
    cfg = PretrainConfig()
    assert all(isinstance(getattr(cfg, name), m.config) for name, m in known.items())  # one section per method
    assert {name: m.local_crops for name, m in known.items() if name in TINY_HEADS} == {
        "dino": True, "simclr": False, "mae": False, "mocov3": False, "byol": False}
    assert register(known["simclr"]) is known["simclr"]  # re-registering the same method is a no-op
    with pytest.raises(ValueError, match="already registered"):
        register(Method("simclr", dict, lambda *a: None))
    with pytest.raises(ValueError, match="unknown method 'swav'"):
        get_method("swav")


def _views(aug: AugmentConfig, n: int = 4) -> dict[str, torch.Tensor]:
    ds = MultiCropDataset(ArraySource(np.random.default_rng(0).random((n, 3, 80, 80), dtype=np.float32)), aug)
    return MultiCropCollate(aug, 8)([ds[i] for i in range(n)])


@pytest.mark.parametrize("name", ["dino", "simclr", "mocov3", "mae", "byol"])
def test_every_method_trains_the_segmentation_encoder(name):
    """One step of each method on the nano encoder (DINO with masks and 32-px local crops, MAE on a
    quarter of the patches) moves its blocks and neck."""
    torch.manual_seed(0)
    method = get_method(name)
    enc = Encoder(variant("nano", depth=2), mask_token=True)
    aug = AugmentConfig(global_size=64, local_size=32, n_local=2 if method.local_crops else 0, mask_probability=1.0)
    objective = method.build(enc, method.config(**TINY_HEADS[name]), aug.global_size)
    out = objective(_views(aug), Progress(0, 0, 10, 100))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert enc.blocks[1].mlp.lin1.weight.grad.abs().sum() > 0 and enc.neck[0].weight.grad.abs().sum() > 0
    assert (enc.mask_token.grad is not None) == (name == "dino")  # only iBOT masks patches


def test_encoder_on_a_subset_of_patches_keeps_their_grid_positions():
    """MAE's ``keep``: the kept patches attend as they would in the full grid (rel-pos bias included) and
    nothing of the dropped patches reaches them."""
    torch.manual_seed(0)
    cfg = variant("nano", depth=2)
    enc = Encoder(cfg, mask_token=True)
    with torch.no_grad():
        for blk in enc.blocks:  # non-zero rel-pos tables, so that a wrong position would show
            blk.attn.rel_pos_h.normal_()
            blk.attn.rel_pos_w.normal_()
        x = torch.randn(2, 3, cfg.tile, cfg.tile)
        n = cfg.grid**2
        order = torch.stack([torch.randperm(n) for _ in range(2)])
        full = enc.forward_tokens(x)["patches"]
        # every patch, in a shuffled order: the full forward, shuffled alike (float tolerance 1e-5)
        shuffled = enc.forward_tokens(x, keep=order)["patches"]
        want = full.gather(1, order.unsqueeze(-1).expand(-1, -1, enc.embed_dim))
        torch.testing.assert_close(shuffled, want, atol=1e-5, rtol=1e-5)
        keep = order[:, : n // 4]
        dropped = order[0, n // 4]
        x2 = x.clone()
        r, c = divmod(int(dropped), cfg.grid)
        x2[0, :, r * cfg.patch:(r + 1) * cfg.patch, c * cfg.patch:(c + 1) * cfg.patch] += 10.0
        assert torch.equal(enc.forward_tokens(x2, keep=keep)["patches"], enc.forward_tokens(x, keep=keep)["patches"])


class _NoSubset(torch.nn.Module):
    """A Backbone whose forward_tokens has no ``keep``."""

    embed_dim, patch_size, in_chans, depth = 8, 8, 3, 1

    def __init__(self) -> None:
        super().__init__()
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 8))

    def forward_tokens(self, x, masks=None):
        raise NotImplementedError


def test_mae_needs_a_backbone_that_encodes_a_subset_and_bad_backbones_are_named():
    from phenoscope.ssl.pretrain import PretrainConfig, build_backbone

    method = get_method("mae")
    assert isinstance(_NoSubset(), Backbone)
    with pytest.raises(ValueError, match="_NoSubset does not"):
        method.build(_NoSubset(), method.config(**TINY_HEADS["mae"]), 64)
    with pytest.raises(ValueError, match=r"unknown backbone 'seg-huge'; choose from \('vit', 'cnn', 'seg-large'"):
        build_backbone(PretrainConfig(backbone="seg-huge"), 3)
    with pytest.raises(ValueError, match="seg-nano takes at most 3 channels, the data have 4"):
        build_backbone(PretrainConfig(backbone="seg-nano"), 4)


PRETRAIN = """
[augment]
global_size = 128
n_local = 0
[train]
epochs = 1
batch_size = 2
max_steps = 2
warmup_epochs = 0
lr = 1e-3
progress_bar = false
[mocov3]
proj_hidden_dim = 64
proj_dim = 32
pred_hidden_dim = 64
"""


def _write_pairs(root, n=4, shape=(144, 144)):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for seed in range(n):
        img, lab = synthetic_nuclei(shape, n=12, seed=seed)
        imwrite_tiff(root / "images" / f"img{seed}.tif", img)
        imwrite_tiff(root / "labels" / f"img{seed}_masks.tif", lab.astype(np.uint16))
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A nano segmentation encoder pretrained with MoCo v3 for 2 steps (4 images, batch 2) through the CLI, and its data."""
    from phenoscope.cli import main

    root = tmp_path_factory.mktemp("seam")
    data = _write_pairs(root / "data")
    (root / "moco.toml").write_text(PRETRAIN)
    torch.manual_seed(0)
    rc = main(["pretrain", "--method", "mocov3", "--backbone", "seg-nano", "--data", str(data / "images"),
               "--out", str(root / "ssl"), "--config", str(root / "moco.toml"), "--threads", "1"])
    assert rc == 0
    return root / "ssl" / "backbone.safetensors", data


@pytest.mark.slow  # ≈ 75 s: pretrains, then trains segmentation
def test_moco_pretrained_encoder_starts_segmentation_training(pretrained, tmp_path, monkeypatch):
    from phenoscope.cli import main
    from phenoscope.segment.checkpoint import load_network
    from phenoscope.train import loop

    path, data = pretrained
    ckpt = read_checkpoint(path)
    assert ckpt.kind == "seg-encoder" and ckpt.config == json_form(variant("nano"))
    assert ckpt.preprocessing.normalize == "percentile" and ckpt.preprocessing.input_size == 128
    ssl_state = {k: v for k, v in ckpt.state.items() if k != "mask_token"}
    torch.manual_seed(0)
    random_init = Encoder(variant("nano")).state_dict()
    assert any(not torch.equal(ssl_state[k], random_init[k]) for k in ssl_state)  # pretraining moved the weights

    at_start: dict[str, torch.Tensor] = {}
    real_train = loop.train

    def spy(objective, *args, **kwargs):  # the encoder the loop receives, before its first step
        at_start.update({k: v.detach().clone() for k, v in objective.net.encoder.state_dict().items()})
        return real_train(objective, *args, **kwargs)

    monkeypatch.setattr(loop, "train", spy)  # train_segmentation imports it when called
    out = tmp_path / "seg"
    (tmp_path / "seg.toml").write_text("min_images_per_epoch = 2\n")  # 4 images, batch 2: 2 steps
    rc = main(["train", "--images", str(data / "images"), "--labels", str(data / "labels"), "--out", str(out),
               "--model", "nano", "--init-backbone", str(path), "--epochs", "1", "--batch-size", "2", "--lr", "1e-3",
               "--val-every", "0", "--val-fraction", "0", "--threads", "1", "--config", str(tmp_path / "seg.toml")])
    assert rc == 0
    assert at_start.keys() == ssl_state.keys() and all(torch.equal(at_start[k], ssl_state[k]) for k in ssl_state)
    trained = load_network(out / "model.safetensors").encoder.state_dict()
    changed = [k for k in ssl_state if not torch.equal(trained[k], ssl_state[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "neck.0.weight" in changed


def test_mismatched_init_backbone_is_refused_before_training(pretrained, tmp_path):
    from phenoscope.segment.training import SegTrainConfig, train_segmentation

    path, data = pretrained
    out = tmp_path / "seg"

    def start(model: str, init: str) -> None:
        train_segmentation(SegTrainConfig(model=model, init_backbone=init), data / "images", data / "labels", out)

    with pytest.raises(ValueError, match=r"backbone.safetensors: encoder config does not match the network \(depth: checkpoint 6, network 12"):
        start("tiny", str(path))
    assert not out.exists()  # refused before any training output
    seg_model = save_model(build_net("nano"), tmp_path / "model")  # a whole network gives its encoder, if it fits
    with pytest.raises(ValueError, match=r"model.safetensors: encoder config does not match the network \(depth: checkpoint 6"):
        start("tiny", str(seg_model))
    assert not out.exists()
    state = dict(read_checkpoint(path).state)
    state["blocks.0.extra"] = state.pop("blocks.0.mlp.lin2.bias")
    bad = save_checkpoint(tmp_path / "bad", state, "seg-encoder", json_form(variant("nano")))
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): blocks.0.mlp.lin2.bias; unexpected 1 key\(s\): blocks.0.extra"):
        load_encoder_into(CellposeSAMNet(variant("nano")), bad)
    with pytest.raises(FileNotFoundError, match="init backbone not found"):
        load_encoder_into(build_net("nano"), tmp_path / "none.safetensors")


def test_segmentation_encoder_pretrains_on_the_inputs_segmentation_trains_on(pretrained):
    """Pretraining images of a seg backbone equal segmentation's training inputs of the same files (exactly)."""
    from phenoscope.segment.training import load_training_image
    from phenoscope.ssl.data import FileSource
    from phenoscope.ssl.pretrain import SegmentationInputs

    files = sorted((pretrained[1] / "images").iterdir())
    for merge in (True, False):
        ours = SegmentationInputs(FileSource(files), 3, merge)
        for i, f in enumerate(files):
            np.testing.assert_array_equal(ours[i], load_training_image(f, 3, merge))


def test_save_encoder_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = Encoder(variant("nano", depth=1), mask_token=True)
    net = build_net(variant("nano", depth=1))
    load_encoder_into(net, save_encoder(enc, tmp_path / "enc"))
    want = {k: v for k, v in enc.state_dict().items() if k != "mask_token"}
    assert all(torch.equal(net.encoder.state_dict()[k], v) for k, v in want.items())
