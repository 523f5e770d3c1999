"""Cell augmentations and image sources."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from phenoscope.ssl.augment import (
    random_shift,
    AugmentConfig,
    drop_channel,
    jitter_channels,
    multi_crop,
    normalize_view,
    random_resized_crop,
    rescale_channel,
    self_normalize,
)
from phenoscope.ssl.data import (
    ArraySource,
    ChannelsAsSamples,
    FileSource,
    FOVCrops,
    MultiCropCollate,
    MultiCropDataset,
    cell_crops,
    to_cyx,
)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_random_resized_crop_full_scale_is_resize():
    x = torch.rand(3, 20, 20)
    out = random_resized_crop(x, 20, (1.0, 1.0), (1.0, 1.0), _g())
    assert torch.allclose(out, x, atol=1e-6)
    assert random_resized_crop(torch.rand(2, 30, 50), 16, (0.1, 0.5), (0.75, 1.33), _g()).shape == (2, 16, 16)


def test_random_shift_translates_with_reflected_borders_and_is_off_at_zero():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert random_shift(x, 0, g) is x and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    seen = set()
    for _ in range(50):
        y = random_shift(x, 2, g)
        assert y.shape == x.shape
        # find the shift: the interior of x reappears unchanged at an offset of at most 2 px
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(y[:, 2 + dy : 6 + dy, 2 + dx : 6 + dx], x[:, 2:6, 2:6])]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 10  # many of the 25 offsets occur
    with pytest.raises(ValueError, match="max_shift 8 must be smaller"):
        random_shift(x, 8, g)


def test_self_normalize_modes():
    x = torch.rand(3, 8, 8) * torch.tensor([1.0, 10.0, 100.0])[:, None, None] + 5
    ch = self_normalize(x, "channel")
    assert torch.allclose(ch.mean((1, 2)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(ch.std((1, 2)), torch.ones(3), atol=1e-3)
    im = self_normalize(x, "image")
    assert abs(im.mean().item()) < 1e-5 and not torch.allclose(im.std((1, 2)), torch.ones(3), atol=0.1)
    with pytest.raises(ValueError, match="normalize"):
        self_normalize(x, "bogus")
    cfg = AugmentConfig(normalize="dataset", channel_mean=[5.0, 5.0, 5.0], channel_std=[1.0, 10.0, 100.0])
    assert torch.allclose(normalize_view(x, cfg), (x - 5) / torch.tensor([1.0, 10.0, 100.0])[:, None, None])
    with pytest.raises(ValueError, match="channel_mean"):
        normalize_view(x, AugmentConfig(normalize="dataset"))


def test_channel_drop_zeroes_exactly_one_channel():
    x = torch.rand(4, 6, 6) + 1
    dropped = drop_channel(x, 1.0, _g())
    zero = [(dropped[c] == 0).all().item() for c in range(4)]
    assert sum(zero) == 1
    assert torch.equal(drop_channel(x, 0.0, _g()), x)
    assert torch.equal(drop_channel(x[:1], 1.0, _g()), x[:1])  # never empties a 1-channel image


def test_protein_rescale_and_jitter_per_channel():
    x = torch.rand(3, 6, 6) + 1
    y = rescale_channel(x, 1, (2.0, 2.0), 1.0, _g())
    assert torch.allclose(y[1], 2 * x[1]) and torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    j = jitter_channels(x, 1.0, 0.5, 0.5, _g(3))
    ratio = (j - j.mean((1, 2), keepdim=True)).std((1, 2)) / (x - x.mean((1, 2), keepdim=True)).std((1, 2))
    assert len(set(np.round(ratio.numpy(), 4))) == 3  # independent contrast factors per channel
    assert torch.equal(jitter_channels(x, 0.0, 0.5, 0.5, _g()), x)


def test_multi_crop_views_and_no_local():
    x = torch.rand(3, 40, 40)
    v = multi_crop(x, AugmentConfig(global_size=32, local_size=16, n_local=3), _g())
    assert [t.shape for t in v["global"]] == [(3, 32, 32)] * 2 and [t.shape for t in v["local"]] == [(3, 16, 16)] * 3
    assert not torch.equal(v["global"][0], v["global"][1])
    assert multi_crop(x, AugmentConfig(global_size=32, n_local=0), _g())["local"] == []


def test_collate_and_masks():
    cfg = AugmentConfig(global_size=32, local_size=16, n_local=2)
    ds = MultiCropDataset(ArraySource(np.random.rand(6, 2, 40, 40).astype(np.float32)), cfg)
    batch = MultiCropCollate(cfg, patch_size=8)([ds[i] for i in range(6)])
    assert batch["global"].shape == (12, 2, 32, 32) and batch["local"].shape == (12, 2, 16, 16)
    assert batch["masks"].shape == (12, 16) and batch["masks"].dtype == torch.bool
    assert int(batch["masks"].any(1).sum()) == 6


def test_to_cyx_and_file_sources(tmp_path):
    cyx = np.random.randint(0, 1000, (3, 20, 24)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "cyx.tif", cyx, photometric="minisblack")
    tifffile.imwrite(tmp_path / "yxc.tif", np.moveaxis(cyx, 0, -1))
    for c in range(3):
        tifffile.imwrite(tmp_path / f"ch{c}.tif", cyx[c])
    src = FileSource([tmp_path / "cyx.tif", tmp_path / "yxc.tif", [tmp_path / f"ch{c}.tif" for c in range(3)]])
    for i in range(3):
        assert np.array_equal(src[i], cyx.astype(np.float32))
    assert to_cyx(np.zeros((5, 6))).shape == (1, 5, 6)
    with pytest.raises(ValueError, match="layout"):
        to_cyx(np.zeros((3, 5, 6)), "XYZ")
    np.savez(tmp_path / "a.npz", images=cyx[None])
    assert np.array_equal(ArraySource.from_npz(tmp_path / "a.npz")[0], cyx)
    with pytest.raises(ValueError, match="no array"):
        ArraySource.from_npz(tmp_path / "a.npz", key="x")


def test_fov_crops():
    img = np.arange(2 * 50 * 60, dtype=np.float32).reshape(2, 50, 60)
    fov = FOVCrops([img], 16, crops_per_image=4)
    assert len(fov) == 4
    crop = fov[0]
    assert crop.shape == (2, 16, 16)
    y, x = divmod(int(crop[0, 0, 0]), 60)
    assert np.array_equal(crop, img[:, y : y + 16, x : x + 16])
    with pytest.raises(ValueError, match="smaller"):
        FOVCrops([img], 64)[0]


def test_cell_crops_centred_and_masked():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[10:15, 20:25] = 3  # centroid (12, 22)
    labels[0:3, 0:3] = 7  # touches the border → zero padding
    image = np.stack([np.arange(1600, dtype=np.float32).reshape(40, 40) + 1, np.ones((40, 40), np.float32)])
    crops, ids, centres = cell_crops(image, labels, 8)
    assert ids.tolist() == [3, 7] and crops.shape == (2, 2, 8, 8)
    np.testing.assert_allclose(centres, [[12, 22], [1, 1]])
    assert crops[0, 0, 4, 4] == image[0, 12, 22]  # centre pixel = centroid
    assert crops[1, 1, 0, 0] == 0 and crops[1, 1, 4, 4] == 1  # padded outside the image
    masked, _, _ = cell_crops(image, labels, 8, mask_background=True)
    assert masked[0, 1].sum() == 25  # only the 5x5 cell survives
    with pytest.raises(ValueError, match="do not match"):
        cell_crops(image, labels[:10], 8)


def test_channels_as_samples_covers_every_channel():
    imgs = np.stack([np.stack([np.full((4, 4), 10 * i + c, np.float32) for c in range(3)]) for i in range(2)])
    src = ChannelsAsSamples(ArraySource(imgs), 3)
    assert len(src) == 6
    seen = sorted(float(src[k][0, 0, 0]) for k in range(6))
    assert seen == [0, 1, 2, 10, 11, 12] and src[4].shape == (1, 4, 4)
