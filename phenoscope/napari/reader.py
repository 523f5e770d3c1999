"""napari readers: cellpose-style ``_seg.npy`` files (as ``phenoscope segment --save-seg`` writes them) and
OME-Zarr labels (NGFF 0.4 ``.zattrs`` or 0.5 ``zarr.json``: an image's ``labels/<name>`` groups, as
ome-zarr-py writes them, or one label group with ``image-label`` metadata).

A ``_seg.npy`` is a pickled dict (cellpose's format), so it is loaded with ``allow_pickle``: open
only files you trust, as with cellpose's GUI. OME-Zarr arrays are opened lazily (all pyramid levels,
as a multiscale Labels layer), so labels larger than memory open too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

LayerData = tuple[np.ndarray, dict, str]


def read_seg_npy(path: str | Path) -> list[LayerData]:
    """``[(masks, {"name": ...}, "labels")]`` from a ``_seg.npy``; raises ``ValueError`` naming the file."""
    path = Path(path)
    try:
        dat = np.load(path, allow_pickle=True).item()
        masks = np.asarray(dat["masks"])
    except Exception as err:  # not a pickled dict, no 'masks' key, truncated file
        raise ValueError(f"{path}: not a cellpose _seg.npy ({type(err).__name__}: {err})") from err
    if masks.ndim not in (2, 3) or masks.dtype.kind not in "ui":
        raise ValueError(f"{path}: 'masks' is not a 2D/3D integer label image (shape {masks.shape}, {masks.dtype})")
    name = path.name.removesuffix("_seg.npy")
    return [(masks, {"name": f"{name}_masks"}, "labels")]


def _ome_attrs(group) -> dict:
    """NGFF metadata of a zarr group: 0.5 nests it under ``"ome"``, 0.4 keeps it at the top."""
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))


def _label_groups(root, path: Path) -> list[tuple[str, object]]:
    if "image-label" in _ome_attrs(root):
        return [(path.name.removesuffix(".zarr"), root)]
    if "labels" not in root:
        raise ValueError(f"{path}: an OME-Zarr group without labels")
    labels = root["labels"]
    return [(str(name), labels[name]) for name in _ome_attrs(labels).get("labels", [])]


def read_ome_zarr_labels(path: str | Path) -> list[LayerData]:
    """One Labels layer per OME-Zarr label group, named after it; raises ``ValueError`` naming the path."""
    import zarr

    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
        layers = []
        for name, group in _label_groups(root, path):
            levels = [group[d["path"]] for d in _ome_attrs(group)["multiscales"][0]["datasets"]]
            data = levels if len(levels) > 1 else levels[0]
            layers.append((data, {"name": name, "multiscale": len(levels) > 1}, "labels"))
    except (KeyError, IndexError, TypeError, zarr.errors.GroupNotFoundError) as err:
        raise ValueError(f"{path}: not OME-Zarr labels ({type(err).__name__}: {err})") from err
    if not layers:
        raise ValueError(f"{path}: the OME-Zarr labels group lists no labels")
    return layers


def _has_ome_labels(path: Path) -> bool:
    """Cheap check without zarr: a ``labels`` sub-group, or ``image-label`` in the group's metadata."""
    if (path / "labels").is_dir():
        return True
    meta = [path / "zarr.json", path / ".zattrs"]
    return any(m.is_file() and '"image-label"' in m.read_text(errors="replace") for m in meta)


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """npe2 reader contribution: a reader for one ``*_seg.npy`` file or OME-Zarr folder with labels, else
    None (napari then tries other readers, e.g. napari-ome-zarr for the image itself)."""
    if isinstance(path, list):
        return None
    if str(path).endswith("_seg.npy"):
        return read_seg_npy
    folder = Path(path)
    return read_ome_zarr_labels if folder.is_dir() and _has_ome_labels(folder) else None
