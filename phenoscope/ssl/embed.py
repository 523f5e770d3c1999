"""Field-of-view and single-cell embeddings from any backbone we can load, written as Parquet + AnnData.

``embed_images(images, model, out_dir, cfg, masks=..., metadata=...)``:

- the model is one of our SSL backbones (``backbone.safetensors`` from ``phenoscope pretrain``) or a
  DINOv2 / Cell-DINO checkpoint in the dinov2 format (:func:`load_embedder`);
- field-of-view mode embeds each image (optionally centre-cropped); single-cell mode
  (``cfg.crop_size > 0`` with label masks, e.g. from ``phenoscope segment``) embeds a square crop
  centred on every cell;
- every crop is normalised as the checkpoint records (:class:`~phenoscope.core.checkpoint.Preprocessing`:
  fixed dataset statistics, or self-normalisation per channel, Cell-DINO's evaluation transform, which is
  also what dinov2-format files get); a bag-of-channels backbone embeds every channel separately;
  features are the class token ⊕ mean patch token (:meth:`CellViT.embed`; ``n_last_blocks`` > 1 adds
  earlier class tokens);
- each image's rows go to ``parts/<n>.parquet`` atomically as soon as it is done, so a killed run
  restarts where it stopped and ends with exactly one row per cell; bad images are reported at the end;
- the parts are gathered into ``embeddings.parquet`` (``Metadata_*`` columns + ``f0…``) and
  ``embeddings.h5ad`` or ``.zarr`` (``X`` = features, ``obs`` = metadata).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from phenoscope.batch import Item, make_executor, run_batch
from phenoscope.config import to_dict
from phenoscope.core.io import atomic_path, atomic_write, imread
from phenoscope.core.checkpoint import Preprocessing
from phenoscope.core.device import resolve_device
from phenoscope.ssl.augment import normalize_input
from phenoscope.ssl.backbone import BagOfChannels, CellViT
from phenoscope.ssl.data import cell_crops, to_cyx

OUTPUT_FORMATS = ("h5ad", "zarr")


@dataclass
class EmbedConfig:
    """Embedding options (sizes in pixels)."""

    crop_size: int = 0  # > 0: single-cell mode, crops of this size centred on each cell (needs masks)
    mask_background: bool = False  # single-cell: zero pixels outside the crop's own cell
    center_crop: int = 0  # field-of-view mode: centre crop of this size (0 = whole image)
    n_last_blocks: int = 1  # class tokens of the last n blocks (then the mean patch token)
    normalize: str = ""  # "" = as the checkpoint records; or override: channel | image (self-normalisation)
    layout: str = "auto"  # image axes: CYX, YXC or auto (phenoscope.core.axes.guess_channel_axis)
    channels: list[int] | None = None  # input channels to use, in order; repeats replicate (gray → "0,0,0")
    npz_key: str = "images"  # array of (N, C, H, W) crops in a .npz input (one row per crop)
    batch_size: int = 64  # crops per forward pass
    num_workers: int = 0  # processes each embedding whole images (≤ 1: this process)
    scheduler: str = ""  # a dask.distributed scheduler address to run the images on ("local": a LocalCluster)
    output_format: str = "h5ad"  # AnnData file beside the Parquet table: h5ad | zarr


def load_embedder(path: str | Path) -> tuple[CellViT | BagOfChannels, Preprocessing]:
    """A backbone and its input preprocessing: from our checkpoint (``phenoscope pretrain``), or from a
    dinov2 / Cell-DINO file (then per-channel self-normalisation). A bag-of-channels checkpoint comes
    back wrapped in :class:`BagOfChannels`."""
    from phenoscope.core.checkpoint import read_metadata
    from phenoscope.ssl.checkpoint import load_backbone_checkpoint, load_dinov2_backbone

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix == ".safetensors" and read_metadata(path):
        backbone, prep = load_backbone_checkpoint(path)
        return (BagOfChannels(backbone) if prep.bag_of_channels else backbone), prep
    return load_dinov2_backbone(path), Preprocessing()


def input_channels(model: CellViT | BagOfChannels) -> int | None:
    """Channels the model takes (None: any, bag of channels)."""
    return None if isinstance(model, BagOfChannels) else model.cfg.in_chans


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre ``size``² crop of (C, H, W), zero-padded when the image is smaller."""
    c, h, w = image.shape
    out = np.zeros((c, size, size), np.float32)
    y0, x0 = (h - size) // 2, (w - size) // 2
    src = image[:, max(y0, 0) : max(y0, 0) + size, max(x0, 0) : max(x0, 0) + size]
    out[:, max(-y0, 0) : max(-y0, 0) + src.shape[1], max(-x0, 0) : max(-x0, 0) + src.shape[2]] = src
    return out


def select_channels(image: np.ndarray, channels: list[int] | None, in_chans: int | None) -> np.ndarray:
    """(C, H, W) → the model's input channels: ``channels`` in that order (repeats replicate a gray
    image); else a constant last channel (alpha) beyond ``in_chans`` is dropped, as ``segment`` does.
    Raises ``ValueError`` with a hint when the count still differs from ``in_chans``."""
    if channels:
        bad = [c for c in channels if not -image.shape[0] <= c < image.shape[0]]
        if bad:
            raise ValueError(f"channels {bad} do not exist: the image has {image.shape[0]} (shape {image.shape})")
        image = image[list(channels)]
    elif in_chans is not None and image.shape[0] == in_chans + 1 and np.ptp(image[-1]) == 0:
        image = image[:-1]
    if in_chans is not None and image.shape[0] != in_chans:
        hint = ",".join(["0"] * in_chans) if image.shape[0] == 1 else ",".join(map(str, range(in_chans)))
        raise ValueError(f"image has {image.shape[0]} channels (shape {image.shape}); the model needs {in_chans}: "
                         f"choose them with channels (--channels {hint})")
    return image


def _npz_crops(path: Path, cfg: EmbedConfig, in_chans: int | None) -> tuple[np.ndarray, pd.DataFrame]:
    """A .npz of (N, C, H, W) crops (``cfg.npz_key``) → one row per crop, ``Metadata_Label`` 1..N."""
    with np.load(path, allow_pickle=False) as z:
        if cfg.npz_key not in z:
            raise ValueError(f"no array {cfg.npz_key!r} in the .npz (arrays: {sorted(z.files)})")
        arr = z[cfg.npz_key]
    if arr.ndim != 4:
        raise ValueError(f"array {cfg.npz_key!r} has shape {arr.shape}; expected (N, C, H, W) crops")
    crops = np.stack([select_channels(a, cfg.channels, in_chans) for a in arr.astype(np.float32)]) if len(arr) else arr
    if not np.isfinite(crops).all():
        raise ValueError("crops contain NaN or inf values")
    h, w = crops.shape[-2:]
    n = len(crops)
    obs = pd.DataFrame({"Metadata_Image": path.stem, "Metadata_Label": np.arange(1, n + 1, dtype=np.int64),
                        "Metadata_CentroidY": np.full(n, h / 2), "Metadata_CentroidX": np.full(n, w / 2)})
    return crops.astype(np.float32), obs


def image_crops(image_path: Path, mask_path: Path | None, cfg: EmbedConfig, in_chans: int | None) -> tuple[np.ndarray, pd.DataFrame]:
    """The crops (n, C, s, s) of one image (or every crop of a ``.npz``) and their ``Metadata_*`` rows."""
    if image_path.suffix == ".npz":
        return _npz_crops(image_path, cfg, in_chans)
    image = select_channels(to_cyx(imread(image_path), cfg.layout).astype(np.float32), cfg.channels, in_chans)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or inf values")
    meta = {"Metadata_Image": image_path.stem}
    if cfg.crop_size:
        if mask_path is None:
            raise ValueError("single-cell mode needs a label mask for every image")
        labels = imread(mask_path)
        if labels.shape != image.shape[1:]:
            raise ValueError(f"mask {mask_path.name} has shape {labels.shape}, image is {image.shape[1:]}")
        crops, ids, centres = cell_crops(image, labels, cfg.crop_size, cfg.mask_background)
        obs = pd.DataFrame({**meta, "Metadata_Label": ids.astype(np.int64),
                            "Metadata_CentroidY": centres[:, 0], "Metadata_CentroidX": centres[:, 1]})
        return crops, obs
    crop = center_crop(image, cfg.center_crop) if cfg.center_crop else image
    return crop[None], pd.DataFrame({**meta, "Metadata_Label": [0], "Metadata_CentroidY": [image.shape[1] / 2],
                                     "Metadata_CentroidX": [image.shape[2] / 2]})


@dataclass
class _EmbedJob:
    """Per-image step of :func:`embed_images`: crops → features → ``parts/<n>.parquet`` (atomic)."""

    model: CellViT | BagOfChannels
    cfg: EmbedConfig
    device: torch.device
    prep: Preprocessing

    def __call__(self, item: Item) -> int:
        crops, obs = image_crops(item.source, item.extra, self.cfg, input_channels(self.model))
        feats = embed_crops(self.model, crops, self.cfg, self.device, self.prep)
        table = pd.concat([obs, pd.DataFrame(feats, columns=[f"f{j}" for j in range(feats.shape[1])])], axis=1)
        with atomic_path(item.outputs[0]) as tmp:
            table.to_parquet(tmp, index=False)
        return len(table)


@torch.inference_mode()
def embed_crops(
    model: CellViT | BagOfChannels, crops: np.ndarray, cfg: EmbedConfig, device: torch.device,
    prep: Preprocessing | None = None,
) -> np.ndarray:
    """(n, C, s, s) crops → (n, F) float32 features, in batches of ``cfg.batch_size``, each crop
    normalised as ``prep`` records (default: self-normalised per channel) unless ``cfg.normalize`` overrides."""
    prep = prep or Preprocessing()
    mode = cfg.normalize or prep.normalize
    out = []
    for start in range(0, len(crops), cfg.batch_size):
        x = torch.from_numpy(crops[start : start + cfg.batch_size]).to(device)
        x = normalize_input(x, mode, prep.channel_mean, prep.channel_std)
        out.append(model.embed(x, cfg.n_last_blocks).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _run_key(model_path: Path, cfg: EmbedConfig, images: list[Path], masks: list[Path | None]) -> str:
    h = hashlib.sha1()
    with open(model_path, "rb") as fh:
        h.update(fh.read(1 << 20))  # the first MiB is enough to tell models apart; don't read a whole ViT-L
    h.update(json.dumps({k: v for k, v in to_dict(cfg).items() if k not in ("batch_size", "num_workers", "scheduler", "output_format")},
                        sort_keys=True).encode())
    h.update("\n".join(f"{i}|{m}" for i, m in zip(images, masks)).encode())
    return h.hexdigest()[:16]


def embed_images(
    images: list[Path],
    model_path: str | Path,
    out_dir: str | Path,
    cfg: EmbedConfig,
    masks: list[Path | None] | None = None,
    metadata: pd.DataFrame | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed ``images`` (with their ``masks`` in single-cell mode); see the module docstring.

    ``metadata`` rows are joined on ``Metadata_Image`` (the image file stem). Returns a summary with
    the row count, the images done in this run, those skipped as already done, and the failures.
    """
    if cfg.output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {cfg.output_format!r}")
    if metadata is not None and "Metadata_Image" not in metadata:
        raise ValueError("the metadata table needs a Metadata_Image column (image file stems)")
    model_path, out_dir = Path(model_path), Path(out_dir)
    masks = masks if masks is not None else [None] * len(images)
    dev = resolve_device(device)
    model, prep = load_embedder(model_path)
    model = model.to(dev).eval()
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    key = _run_key(model_path, cfg, images, masks)
    state_file = out_dir / "embed_run.json"
    if state_file.exists() and json.loads(state_file.read_text())["key"] != key:
        raise ValueError(f"{out_dir} holds a run with other inputs, model or options; use a new --out folder")
    with atomic_write(state_file, "w") as fh:
        json.dump({"key": key, "model": str(model_path), "config": to_dict(cfg)}, fh, indent=2)
    items = [Item(Path(im), (parts / f"{n:07d}.parquet",), mk) for n, (im, mk) in enumerate(zip(images, masks))]
    job = _EmbedJob(model, cfg, dev, prep)
    report = run_batch(items, job, make_executor(cfg.num_workers, scheduler=cfg.scheduler or None), progress=progress, desc="embed")
    failures = report.failure_lines()
    n_rows = gather(out_dir, len(images), metadata, cfg.output_format)
    return {"rows": n_rows, "embedded": len(report.done), "already_done": len(report.skipped), "failed": failures}


def gather(out_dir: Path, n_images: int, metadata: pd.DataFrame | None, output_format: str) -> int:
    """Concatenate the per-image parts (in input order) into ``embeddings.parquet`` and AnnData."""
    import anndata as ad

    files = [out_dir / "parts" / f"{n:07d}.parquet" for n in range(n_images)]
    tables = [pd.read_parquet(f) for f in files if f.exists()]
    if not tables:
        return 0
    table = pd.concat(tables, ignore_index=True)
    if metadata is not None:
        extra = metadata.rename(columns=lambda c: c if c.startswith("Metadata_") else f"Metadata_{c}")
        table = table.merge(extra, on="Metadata_Image", how="left", validate="many_to_one")
    feats = [c for c in table.columns if not c.startswith("Metadata_")]
    table = table[[c for c in table.columns if c.startswith("Metadata_")] + feats]
    with atomic_path(out_dir / "embeddings.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    obs = table.drop(columns=feats)
    obs.index = [f"{i}:{lab}" for i, lab in zip(obs["Metadata_Image"], obs["Metadata_Label"])]
    adata = ad.AnnData(X=table[feats].to_numpy(np.float32), obs=obs)
    adata.var_names = feats
    target = out_dir / f"embeddings.{output_format}"
    if output_format == "h5ad":
        with atomic_path(target) as tmp:
            adata.write_h5ad(tmp)
    else:  # a zarr store is a folder: write beside it, then swap
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        adata.write_zarr(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return len(table)
