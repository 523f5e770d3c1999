"""Training data for segmentation: image/label pairing, flows computed once and cached, the
validation split, and the dataset of augmented tiles."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from phenoscope.core.io import IMAGE_SUFFIXES, atomic_path, imread, label_file_for
from phenoscope.segment.flows import diameter
from phenoscope.segment.net import NetConfig
from phenoscope.segment.preprocess import padded_network_input
from phenoscope.segment.training.augment import SegAugmentConfig, augment_sample


@dataclass
class Sample:
    """One training image: normalised (3, H, W) image, (2, H, W) unit flows, labels and diameter, and
    optionally its per-pixel class target (H, W) (:mod:`phenoscope.segment.semantic`)."""

    image: np.ndarray
    flows: np.ndarray
    labels: np.ndarray
    diameter: float
    classes: np.ndarray | None = None


def find_pairs(images: str | Path, labels: str | Path, only: set[str] | None = None) -> list[tuple[Path, Path]]:
    """Match every image in ``images`` (with ``only``: every image whose stem it holds; the others may have
    no labels) to ``labels/<stem>{,_masks,_labels,...}.<ext>``; error lists the unmatched."""
    images, labels = Path(images), Path(labels)
    for d in (images, labels):
        if not d.is_dir():
            raise FileNotFoundError(f"not a folder: {d}")
    pairs, missing = [], []
    for img in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and (only is None or p.stem in only)):
        lab = label_file_for(img, labels)
        (pairs.append((img, lab)) if lab is not None else missing.append(img.name))
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no label file in {labels}: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    if not pairs:
        raise ValueError(f"no images found in {images}")
    return pairs


def load_training_image(path: Path, in_chans: int = 3, merge_identical: bool = True) -> np.ndarray:
    """(in_chans, H, W) float32, each channel 1–99 % normalised, zero-padded to ``in_chans``.

    Prepared exactly as at inference (:func:`phenoscope.segment.preprocess.network_input`): with
    ``merge_identical`` a gray image saved as RGB(A) becomes one channel.
    """
    return padded_network_input(imread(path), None, in_chans, merge_identical)


def cached_flows(labels: np.ndarray, cache_dir: Path | None) -> np.ndarray:
    """Unit flows (2, H, W) of a label image, read from / written to ``cache_dir`` (keyed by content)."""
    from phenoscope.segment.flows import masks_to_flows

    if cache_dir is None:
        return masks_to_flows(labels)
    key = hashlib.sha1(np.ascontiguousarray(labels).tobytes() + str(labels.shape).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.npy"
    if path.exists():
        return np.load(path)
    flows = masks_to_flows(labels).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, flows)
    return flows


def read_pairs(pairs: list[tuple[Path, Path]], net_cfg: NetConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(network-ready image (C, H, W), int32 labels (H, W)) of every pair; the bad files are collected and
    reported together in one ``ValueError`` line, before anything is computed or written."""
    from phenoscope.segment.flows import check_labels

    read, errors = [], []
    for img_path, lab_path in pairs:
        try:
            labels = imread(lab_path)
            if labels.ndim == 3:  # a volume: trained through its planes
                read.extend(volume_planes(imread(img_path), check_labels(labels, f"label volume {lab_path.name}"),
                                          net_cfg))
                continue
            image = load_training_image(img_path, net_cfg.in_chans, net_cfg.merge_identical_channels)
            if labels.ndim != 2 or labels.shape != image.shape[1:]:
                raise ValueError(f"label image {lab_path.name} has shape {labels.shape}, image is {image.shape[1:]}")
            read.append((image, check_labels(labels, f"label image {lab_path.name}").astype(np.int32)))
        except (ValueError, OSError) as err:
            errors.append(f"{img_path.name}: {err}")
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ValueError(f"{len(errors)} training pair(s) could not be used: " + "; ".join(errors[:3]) + more)
    return read


def volume_planes(volume: np.ndarray, labels: np.ndarray, net_cfg: NetConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Training pairs (image (in_chans, h, w), int32 labels (h, w)) from the YX, ZY and ZX planes of a
    volume (Z first: ZYX, or 4D with channels) and its (Z, Y, X) labels, as the 3D mode sees them at
    inference (normalised over the whole volume). Planes without cells, or with a side shorter than
    16 px, are skipped; each plane's objects are split into connected pieces (a 3D cell can cut a plane
    twice)."""
    from skimage.measure import label

    from phenoscope.segment.preprocess import MIN_SIDE
    from phenoscope.segment.volume import volume_input

    x = volume_input(volume, 0, None, net_cfg.in_chans, net_cfg.merge_identical_channels)
    if x.shape[1:] != labels.shape:
        raise ValueError(f"label volume has shape {labels.shape}, the volume is {x.shape[1:]}")
    out = []
    for axis in range(3):  # planes across Z (YX), Y (ZX) and X (ZY)
        for k in range(labels.shape[axis]):
            lab = np.take(labels, k, axis=axis)
            if min(lab.shape) < MIN_SIDE or not lab.any():
                continue
            img = np.zeros((net_cfg.in_chans, *lab.shape), np.float32)
            img[: x.shape[0]] = np.take(x, k, axis=axis + 1)
            out.append((img, label(lab, background=0, connectivity=1).astype(np.int32)))
    return out


def to_samples(read: list[tuple[np.ndarray, np.ndarray]], cache_dir: Path | None, progress: bool = True) -> list[Sample]:
    """Samples of read pairs: unit flows computed once (cached in ``cache_dir``) and each label image's diameter."""
    from tqdm.auto import tqdm

    return [Sample(image, cached_flows(labels, cache_dir), labels, diameter(labels))
            for image, labels in tqdm(read, desc="flows", unit="image", disable=not progress, leave=False)]


def read_ids(path: str | Path) -> set[str]:
    """The image stems listed in a file, one per line (blank lines and ``#`` comments skipped)."""
    return {s.strip() for s in Path(path).read_text().splitlines() if s.strip() and not s.startswith("#")}


def split_pairs(pairs: list[tuple[Path, Path]], val_ids: str = "", val_fraction: float = 0.1, seed: int = 0,
                exclude_ids: str = "", train_ids: str = "") -> tuple[list, list]:
    """(train, val) pairs: the stems listed in the file ``val_ids``, else a ``val_fraction`` drawn with ``seed``.

    The stems listed in ``exclude_ids`` are in neither (e.g. a test split kept out of model selection).
    With ``train_ids``, training takes only the stems that file lists (each must have a pair that is
    neither validated on nor excluded: ``ValueError`` otherwise)."""
    if exclude_ids:
        excluded = read_ids(exclude_ids)
        pairs = [p for p in pairs if p[0].stem not in excluded]
    if val_ids:
        wanted = read_ids(val_ids)
        unknown = wanted - {p[0].stem for p in pairs}
        if unknown:
            raise ValueError(f"{len(unknown)} validation id(s) in {val_ids} have no image (or are excluded), e.g. {sorted(unknown)[:3]}")
        val = [p for p in pairs if p[0].stem in wanted]
    else:
        n_val = int(round(val_fraction * len(pairs)))
        rng = np.random.default_rng(seed)
        chosen = set(rng.choice(len(pairs), size=n_val, replace=False).tolist()) if n_val else set()
        val = [p for i, p in enumerate(pairs) if i in chosen]
    val_set = {p[0] for p in val}
    train = [p for p in pairs if p[0] not in val_set]
    if train_ids:
        wanted = read_ids(train_ids)
        if not wanted:
            raise ValueError(f"{train_ids}: lists no training image")
        unknown = wanted - {p[0].stem for p in train}
        if unknown:
            raise ValueError(f"{len(unknown)} training id(s) in {train_ids} have no image (or are validated on or excluded), "
                             f"e.g. {sorted(unknown)[:3]}")
        train = [p for p in train if p[0].stem in wanted]
    return train, val


class SegmentationDataset(Dataset):
    """Augmented tiles of :class:`Sample` s; tile ``i`` of epoch ``e`` is a pure function of (seed, e, i).

    Items: ``image`` (C, t, t), ``target`` (3, t, t) and, for samples with classes, ``classes`` (t, t) int64."""

    def __init__(self, samples: list[Sample], cfg: SegAugmentConfig, tile: int, seed: int = 0, min_len: int = 8) -> None:
        if not samples:
            raise ValueError("no training images")
        self.samples, self.cfg, self.tile, self.seed, self.epoch = samples, cfg, tile, seed, 0
        self.length = max(len(samples), min_len)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i % len(self.samples)]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image, target = augment_sample(s.image, s.flows, s.labels > 0, s.diameter, self.tile, rng, self.cfg, classes=s.classes)
        item = {"image": torch.from_numpy(image), "target": torch.from_numpy(target[:3])}
        if s.classes is not None:
            item["classes"] = torch.from_numpy(target[3].astype(np.int64))
        return item
