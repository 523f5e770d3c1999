"""Cellpose-SAM network and checkpoints vs cellpose 4.2.1.1 ``CPSAM`` with identical random weights (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from phenoscope.core.checkpoint import read_checkpoint
from phenoscope.core.normalize import normalize_percentile
from phenoscope.datasets import dsb_image, dsb_index
from phenoscope.segment.checkpoint import (
    import_cellpose_state,
    load_cellpose_checkpoint,
    load_network,
    save_model,
)
from phenoscope.segment.net import build_net, rel_pos_lookup, variant

TOL = 1e-3


def random_cpsam(seed: int = 0):
    """cellpose ``CPSAM()`` with random weights, including the tables SAM initialises to zero.

    SAM zero-initialises ``pos_embed`` and the relative-position tables, which would leave the
    rel-pos path untested; we fill them (and perturb the norms) so every parameter matters.
    """
    cellpose = pytest.importorskip("phenoscope.testing").import_cellpose()
    torch.manual_seed(seed)
    ref = cellpose.vit.CPSAM().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
            elif "pos_embed" in name:
                p.normal_(0, 0.02)
            elif "norm" in name or name.startswith(("encoder.neck.1", "encoder.neck.3")):
                p.add_(0.1 * torch.randn_like(p))
    return ref


def truncated_state(state: dict, depth: int) -> dict:
    """The state dict of the first ``depth`` blocks (for a fast network of the same code path)."""
    return {k: v for k, v in state.items() if not (k.startswith("encoder.blocks.") and int(k.split(".")[2]) >= depth)}


def dsb_tiles(root, n: int, tile: int = 256) -> np.ndarray:
    """(n, 3, tile, tile) normalised top-left crops of real DSB images."""
    ids = dsb_index(root).image_id
    out = []
    for image_id in ids[:: max(1, len(ids) // n)][:n]:
        img = dsb_image(root, image_id)[:tile, :tile]
        out.append(np.moveaxis(normalize_percentile(img, channel_axis=-1), -1, 0))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def reference():
    return random_cpsam()


def test_large_has_cpsam_shapes(reference):
    ours = build_net("large")
    theirs = {k: v.shape for k, v in reference.state_dict().items() if k not in ("W2", "diam_mean", "diam_labels")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    n = sum(p.numel() for p in ours.parameters())
    assert round(n / 1e6, 1) == 304.6


# slow (≈ 100 s): the full 24-block network; the default suite checks the same code path on 1-block cpsam (test_inference)
@pytest.mark.slow
def test_large_matches_cellpose_on_dsb_tiles(reference, dsb_dir):
    net = import_cellpose_state(reference.state_dict()).eval()
    x = torch.from_numpy(dsb_tiles(dsb_dir, 2))
    with torch.no_grad():
        expected = reference(x)[0]
    got = net(x)
    diff = (got - expected).abs().max().item()
    rel = ((got - expected).norm() / expected.norm()).item()
    print(f"large net vs cellpose CPSAM: max abs diff {diff:.2e}, relative L2 error {rel:.2e}")
    assert got.shape == (2, 3, 256, 256)
    assert diff <= TOL and rel < 1e-5


def test_rel_pos_cache_follows_weight_updates(reference):
    net = import_cellpose_state(truncated_state(reference.state_dict(), 1)).eval()
    attn = net.encoder.blocks[0].attn
    with torch.no_grad():
        first = attn.rel_tables(32, 32)[0].clone()
        assert attn.rel_tables(32, 32)[0] is attn.rel_tables(32, 32)[0]  # cached, not recomputed
        attn.rel_pos_h.mul_(2)
        updated = attn.rel_tables(32, 32)[0]
    assert torch.allclose(updated, 2 * first)
    assert torch.equal(updated, rel_pos_lookup(attn.rel_pos_h.detach(), 32))


def test_training_gradients_reach_rel_pos():
    net = build_net(variant("tiny", depth=1))
    net(torch.rand(1, 3, 256, 256)).square().mean().backward()
    assert net.encoder.blocks[0].attn.rel_pos_h.grad is not None


@pytest.mark.parametrize("name,depth,dim", [("small", 12, 384), ("tiny", 12, 192)])
def test_variants_share_the_code_path(name, depth, dim):
    net = build_net(name)
    assert len(net.encoder.blocks) == depth and net.cfg.dim == dim
    with torch.no_grad():
        y = net(torch.rand(1, 3, 256, 256))
    assert y.shape == (1, 3, 256, 256) and torch.isfinite(y).all()


def test_cellpose_file_import_and_safetensors_roundtrip(reference, tmp_path):
    state = truncated_state(reference.state_dict(), 2)
    torch.save(state, tmp_path / "cpsam_small.pt")
    net = load_cellpose_checkpoint(tmp_path / "cpsam_small.pt")
    assert net.cfg.depth == 2 and net.cfg.rel_pos_rows == (27, 27)
    path = save_model(net, tmp_path / "model")
    assert path.suffix == ".safetensors" and not path.with_suffix(".json").exists()  # self-describing
    ckpt = read_checkpoint(path)
    assert ckpt.kind == "cellpose-sam" and ckpt.preprocessing.normalize == "percentile"
    again = load_network(path)
    assert again.cfg == net.cfg
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_strict_load_reports_key_diff(reference, tmp_path):
    state = truncated_state(reference.state_dict(), 2)
    del state["encoder.blocks.1.mlp.lin2.bias"]
    state["encoder.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): encoder.blocks.1.mlp.lin2.bias; unexpected 1 key\(s\): encoder.extra"):
        import_cellpose_state(state)
    with pytest.raises(ValueError, match="W2"):
        import_cellpose_state({k: v for k, v in reference.state_dict().items() if k != "W2"})
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_cellpose_checkpoint(tmp_path / "bad.pt")


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt: contains non-tensor objects; refused \(weights are loaded without executing code\)"):
        load_cellpose_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
