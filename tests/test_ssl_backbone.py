"""Backbone, bag-of-channels and dinov2 checkpoint import.

The parity reference is the real ``dinov2`` package from PyPI (``dinov2==0.0.1.dev2``,
Meta's code, installed with ``pip install --no-deps dinov2``; xFormers absent so it uses its
plain attention). Random weights, fp32, CPU.
"""

from __future__ import annotations

import pytest
import torch

from phenoscope.core.state import load_state_strict

from phenoscope.ssl.backbone import BagOfChannels, CellViT, ViTConfig, interpolate_pos_embed_dinov2
from phenoscope.ssl.checkpoint import (
    convert_dinov2_state_dict,
    load_backbone,
    load_dinov2_backbone,
    save_backbone,
)

TOL = 1e-5


def _reference(in_chans: int, patch: int, img: int, chunks: int):
    vt = pytest.importorskip("dinov2.models.vision_transformer", reason="pip install --no-deps dinov2")
    torch.manual_seed(0)
    ref = vt.vit_small(patch_size=patch, img_size=img, in_chans=in_chans, block_chunks=chunks, init_values=1.0)
    with torch.no_grad():  # randomise everything, layer scale and mask token included
        for name, p in ref.named_parameters():
            if name.endswith("gamma") or (".norm" in name or name.startswith("norm")) and name.endswith("weight"):
                p.copy_(torch.rand_like(p) + 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.05)
    return ref.eval()


def _compare(ref, model, x, masks=None):
    with torch.no_grad():
        want = ref.forward_features(x, masks=masks)
        got = model.forward_tokens(x, masks=masks)
    d_cls = (want["x_norm_clstoken"] - got["cls"]).abs().max().item()
    d_patch = (want["x_norm_patchtokens"] - got["patches"]).abs().max().item()
    return max(d_cls, d_patch)


@pytest.mark.parametrize(
    "in_chans,patch,img,chunks,other_sizes",
    [(3, 14, 518, 0, [(224, 224), (266, 196)]), (5, 8, 128, 4, [(64, 64), (96, 80)])],
)
def test_dinov2_import_parity(in_chans, patch, img, chunks, other_sizes):
    ref = _reference(in_chans, patch, img, chunks)
    state = {"teacher": {f"module.backbone.{k}": v for k, v in ref.state_dict().items()}}
    if chunks:
        assert any(k.count(".") >= 3 and k.split(".")[3].isdigit() for k in state["teacher"])  # blocks.C.I.
    model = load_dinov2_backbone(state).eval()
    assert model.cfg.in_chans == in_chans and model.cfg.patch_size == patch and model.cfg.img_size == img
    torch.manual_seed(1)
    x = torch.randn(2, in_chans, img, img)
    n = (img // patch) ** 2
    masks = torch.rand(2, n) < 0.3
    diffs = [_compare(ref, model, x), _compare(ref, model, x, masks)]
    diffs += [_compare(ref, model, torch.randn(2, in_chans, h, w)) for h, w in other_sizes]  # pos-embed interpolation
    print(f"max abs diff vs dinov2 reference: {diffs}")
    assert max(diffs) <= TOL


def test_fast_embed_matches_dinov2_reference_features():
    """``embed`` (inference path: oneDNN linears on packed weights, fused GELU and residuals, folded
    layer scale) gives the reference's CLS ⊕ mean patch features, also after in-place updates."""
    ref = _reference(5, 8, 128, 0)
    model = load_dinov2_backbone(ref.state_dict()).eval()
    torch.manual_seed(2)
    x = torch.randn(8, 5, 64, 64)
    with torch.no_grad():
        f = ref.forward_features(x)
        want = torch.cat([f["x_norm_clstoken"], f["x_norm_patchtokens"].mean(1)], -1)
        got = model.embed(x)
        for m in (model, ref):  # in-place updates must invalidate the folded and the packed weights
            m.blocks[0].ls1.gamma.mul_(2.0)
            m.blocks[1].attn.qkv.weight.mul_(1.5)
        f2 = ref.forward_features(x)
        want2 = torch.cat([f2["x_norm_clstoken"], f2["x_norm_patchtokens"].mean(1)], -1)
        got2 = model.embed(x)
    assert (want - got).abs().max().item() <= TOL
    assert (want2 - got2).abs().max().item() <= TOL
    assert (want2 - want).abs().max().item() > 100 * TOL


def test_embed_of_a_model_built_in_inference_mode():
    """Parameters made under ``torch.inference_mode`` have no version counter: ``embed`` must not
    cache anything derived from them, and must see an in-place update made in inference mode."""
    cfg = ViTConfig(arch="vit_tiny", in_chans=3, patch_size=8, img_size=32, depth=2, init_values=1.0)
    torch.manual_seed(0)
    normal = CellViT(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        frozen = CellViT(cfg).eval()
        frozen.load_state_dict(normal.state_dict())
        assert frozen.blocks[0].attn.qkv.weight.is_inference()
        first = frozen.embed(x)
        frozen.blocks[0].attn.qkv.weight.mul_(1.5)
        frozen.blocks[0].ls1.gamma.mul_(2.0)
        second = frozen.embed(x)
    with torch.no_grad():
        want = normal.embed(x)
        normal.blocks[0].attn.qkv.weight.mul_(1.5)
        normal.blocks[0].ls1.gamma.mul_(2.0)
        want2 = normal.embed(x)
    assert (first - want).abs().max().item() <= TOL
    assert (second - want2).abs().max().item() <= TOL
    assert (want2 - want).abs().max().item() > 100 * TOL


def test_pos_embed_interpolation_differs_from_plain_resize():
    pos = torch.randn(1, 16 * 16, 8)
    out = interpolate_pos_embed_dinov2(pos, 96, 96, 8)
    assert out.shape == (1, 144, 8)
    plain = torch.nn.functional.interpolate(pos.reshape(1, 16, 16, 8).permute(0, 3, 1, 2), size=(12, 12), mode="bicubic")
    assert not torch.allclose(out, plain.permute(0, 2, 3, 1).reshape(1, 144, 8))
    assert interpolate_pos_embed_dinov2(pos, 128, 128, 8) is pos


def _tiny(**kw) -> CellViT:
    cfg = dict(arch="vit_tiny", depth=2, in_chans=4, patch_size=8, img_size=32)
    cfg.update(kw)
    return CellViT(ViTConfig(**cfg)).eval()


def test_registers_and_shapes():
    model = _tiny(num_registers=4)
    out = model.forward_tokens(torch.randn(3, 4, 32, 40))
    assert out["cls"].shape == (3, 192) and out["registers"].shape == (3, 4, 192) and out["patches"].shape == (3, 20, 192)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, 32, 32))
    assert _tiny(patch_size=5).forward_tokens(torch.randn(1, 4, 40, 40))["patches"].shape == (1, 64, 192)
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(patch_size=0).resolved()


def test_bag_of_channels_uses_every_channel():
    torch.manual_seed(0)
    boc = BagOfChannels(_tiny(in_chans=1))
    x = torch.randn(2, 5, 32, 32)
    base = boc(x)
    assert base.shape == (2, 5 * 192)
    for c in range(5):
        y = x.clone()
        y[:, c] += 1.0
        changed = (boc(y) - base).abs().reshape(2, 5, 192).amax(dim=(0, 2)) > 1e-6
        assert changed.tolist() == [i == c for i in range(5)]


def test_strict_load_reports_key_diff():
    model = _tiny()
    sd = model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["norm.weight"]
    sd["pos_embed"] = torch.zeros(1, 3, 192)
    with pytest.raises(ValueError) as err:
        load_state_strict(model, sd)
    msg = str(err.value)
    assert "missing 1 key(s): norm.weight" in msg and "unexpected 1 key(s): extra.weight" in msg and "pos_embed" in msg


def test_channel_expansion_matches_gray_rgb():
    torch.manual_seed(0)
    rgb = _tiny(in_chans=3)
    state = {k: v for k, v in rgb.state_dict().items()}
    # back to dinov2 layout: class position slot in pos_embed
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, 192), state["pos_embed"]], dim=1)
    expanded = load_dinov2_backbone(state, in_chans=6, num_heads=3).eval()
    gray = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(expanded(gray.repeat(1, 6, 1, 1)), rgb(gray.repeat(1, 3, 1, 1)), atol=1e-5)


def test_safetensors_roundtrip(tmp_path):
    model = _tiny(num_registers=2)
    save_backbone(model, tmp_path / "b.safetensors")
    loaded = load_backbone(tmp_path / "b.safetensors").eval()
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.cfg == model.cfg


def test_convert_rejects_non_vit():
    with pytest.raises(ValueError, match="not a dinov2"):
        convert_dinov2_state_dict({"foo": torch.zeros(1)})
