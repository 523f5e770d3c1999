"""Segment image files into label TIFFs, per-cell tables and viewer files, resumably.

    report = segment_files(["images/"], "out", model="default")   # what `phenoscope segment` runs
    summary = segment_file("a.png", "out", load_segmenter("classic"))

Each image ``<stem>.<ext>`` gives ``<out>/<stem>_masks.tif`` and ``<stem>_cells.csv`` (plus, on request,
``_seg.npy`` for the cellpose GUI, ``_outlines.png`` and ImageJ ``_rois.zip``), every file written
atomically. ``<out>/segment_manifest.json`` records the model (sha256 of its weights file, or
``classic``), the parameters that change masks, and the phenoscope version; a later run into the same
folder with another model or other parameters is refused unless ``overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from phenoscope.batch import (
    BatchReport,
    InputError,
    Item,
    check_writable,
    collect_inputs,
    make_executor,
    plan,
    run_batch,
)
from phenoscope.core.io import atomic_write, imread
from phenoscope.segment.options import MaskOptions

__all__ = [
    "MANIFEST",
    "OUTPUTS",
    "ImageSummary",
    "SegmentJob",
    "SegmentParams",
    "VOLUME_OUTPUTS",
    "check_volume_options",
    "load_segmenter",
    "manifest_for",
    "parse_diameter",
    "segment_file",
    "segment_files",
]

MANIFEST = "segment_manifest.json"
# output kind → file suffix; "masks" and "cells" are always written
OUTPUTS = {"masks": "_masks.tif", "cells": "_cells.csv", "seg": "_seg.npy", "outlines": "_outlines.png",
           "rois": "_rois.zip", "geojson": "_cells.geojson"}

# image → (masks (H, W), flows (2, H, W) or None, cellprob (H, W) or None, diameter used in px or None)
Segmenter = Callable[[np.ndarray], tuple]


@dataclass(frozen=True)
class SegmentParams:
    """Options of one segmentation run (sizes in px).

    do_3d: each file is a volume (ZYX, or 4D with channels; ``z_axis`` says which axis is Z), segmented in
    3D with the 2D network on its three plane orientations; ``anisotropy`` is Z spacing / XY spacing.
    Volumes are segmented at native size unless ``diameter`` (px) is given.

    diameter: typical cell diameter (images are resized so it becomes the model's 30 px), ``"auto"``
    (measured on the masks of a first pass) or None (the model's size estimate, or native size for a model
    without a size head). ``batch_size`` (256² tiles per forward pass)
    does not change masks; every other field does and is recorded in the manifest.
    """

    diameter: float | str | None = None
    options: MaskOptions = field(default_factory=MaskOptions)
    tile_overlap: float = 0.1
    tta: bool = False
    channel_axis: int | None = None
    batch_size: int = 8
    do_3d: bool = False  # volumes: flows from the YX, ZY and ZX planes, then 3D dynamics (cellpose's do_3D)
    z_axis: int = 0  # the volume's Z axis (with do_3d)
    anisotropy: float | None = None  # Z spacing / XY spacing (with do_3d)
    stitch_threshold: float = 0.0  # with do_3d, > 0: 2D masks per Z plane joined by IoU ≥ this (cellpose's stitch mode)

    def __post_init__(self) -> None:
        if self.do_3d and isinstance(self.diameter, str):
            raise ValueError("diameter 'auto' is 2D only; give the diameter in px for a volume")
        if not self.do_3d and (self.z_axis != 0 or self.anisotropy is not None or self.stitch_threshold):
            raise ValueError("z_axis, anisotropy and stitch_threshold apply to volumes only (do_3d)")
        if not 0 <= self.stitch_threshold <= 1:
            raise ValueError(f"stitch_threshold must be in [0, 1], got {self.stitch_threshold}")
        if self.stitch_threshold and self.anisotropy is not None:
            raise ValueError("anisotropy applies to 3D flows; stitching segments each Z plane in 2D")
        if self.anisotropy is not None and not self.anisotropy > 0:
            raise ValueError(f"anisotropy must be > 0, got {self.anisotropy}")


@dataclass(frozen=True)
class ImageSummary:
    """Per-image result: the number of cells and the diameter (px) the image was segmented at."""

    cells: int
    diameter: float | None
    warnings: tuple[str, ...] = ()  # what the segmentation warned about (e.g. dropped channels)

    def describe(self, path: Path) -> str:
        """``<file>: <n> cells, diameter <d> px`` (with a warning when no cell was found, or the image raised one)."""
        size = f"diameter {self.diameter:.1f} px" if self.diameter is not None else "native scale (not resized)"
        notes = [*self.warnings, *(() if self.cells else ("no cells found (check --diameter, --channel-axis and the model)",))]
        return f"{path}: {self.cells} cells, {size}" + "".join(f" — warning: {n}" for n in notes)


def parse_diameter(text: str) -> float | str:
    """A ``--diameter`` value: a positive number of px, or 'auto' (an argparse type)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a diameter in px or 'auto', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"diameter must be > 0 px, got {text}")
    return value


def _weights_file(model: str | Path) -> Path:
    from phenoscope.segment.checkpoint import model_path

    path = model_path(model)
    if not path.is_file():
        raise FileNotFoundError(f"model {model}: no such file")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def manifest_for(model: str | Path, params: SegmentParams) -> dict[str, Any]:
    """The run identity: model (``classic`` or path + sha256 of its weights), mask-changing parameters, version."""
    from phenoscope import __version__

    if str(model) == "classic":  # the classical baseline uses only these two
        identity: dict[str, Any] = {"model": "classic"}
        parameters = {"channel_axis": params.channel_axis, "min_size": params.options.min_size}
    else:
        weights = _weights_file(model)
        identity = {"model": str(weights.resolve()), "sha256": _sha256(weights)}
        volume_only = () if params.do_3d else ("do_3d", "z_axis", "anisotropy", "stitch_threshold")  # 2D keeps its keys
        parameters = {k: v for k, v in asdict(params).items() if k != "batch_size" and k not in volume_only}
    return {**identity, "parameters": parameters, "phenoscope": __version__}


def _same_run(old: dict[str, Any], new: dict[str, Any]) -> bool:
    key = ("sha256",) if "sha256" in new else ("model",)
    return all(old.get(k) == new.get(k) for k in key) and old.get("parameters") == new["parameters"]


def check_manifest(out_dir: Path, manifest: dict[str, Any], items: Sequence[Item], overwrite: bool) -> None:
    """Refuse (``InputError``) to add to ``out_dir`` when it holds outputs of another model or parameters
    (or outputs of ours without a manifest), unless ``overwrite``."""
    if overwrite:
        return
    path = out_dir / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: unreadable manifest ({err}); use --overwrite to redo the run") from None
        if not _same_run(old, manifest):
            changed = [k for k in ("model", "sha256") if old.get(k) != manifest.get(k)]
            old_params = old.get("parameters", {})
            changed += [k for k, v in manifest["parameters"].items() if old_params.get(k) != v]
            raise InputError(f"{path}: {out_dir} holds masks of another run (differs in {', '.join(changed)}); "
                             "use --overwrite to redo them, or another --out folder")
    elif any(p.exists() for item in items for p in item.outputs):
        raise InputError(f"{out_dir}: holds outputs without a {MANIFEST} (unknown model and parameters); "
                         "use --overwrite to redo them, or another --out folder")


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``<out_dir>/segment_manifest.json`` atomically."""
    with atomic_write(out_dir / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2)


def load_segmenter(model: str | Path, params: SegmentParams = SegmentParams(), device: str | None = None) -> Segmenter:
    """``classic`` (Otsu + watershed), ``default`` or a weights file → a callable ``image → (masks, flows,
    cellprob, diameter)`` (flows, cellprob and diameter are None for ``classic``)."""
    if str(model) == "classic":
        return _Classic(params.channel_axis, params.options.min_size)
    from phenoscope.segment.inference import load_model

    from phenoscope.core.device import resolve_device

    resolve_device(device)
    weights = _weights_file(model)
    try:
        return _Network(load_model(weights, device=device), params)
    except (ValueError, OSError, RuntimeError) as err:  # bad weights file; torch's "invalid device string"
        raise InputError(f"model {model}: {err}") from None


@dataclass
class _Classic:
    channel_axis: int | None
    min_size: int

    def __call__(self, image: np.ndarray) -> tuple:
        from phenoscope.segment.classic import segment_classic

        return segment_classic(image, channel_axis=self.channel_axis, min_size=self.min_size), None, None, None


@dataclass
class _Network:
    model: Any  # phenoscope.segment.inference.CellposeSAM
    params: SegmentParams

    def __call__(self, image: np.ndarray) -> tuple:
        p = self.params
        if p.do_3d and p.stitch_threshold:
            res = self.model.segment_planes(image, p.z_axis, p.channel_axis, p.diameter, p.stitch_threshold, p.options,
                                            p.tile_overlap, p.batch_size, p.tta)
        elif p.do_3d:
            res = self.model.segment_3d(image, p.z_axis, p.channel_axis, p.diameter, p.anisotropy, p.options,
                                        p.tile_overlap, p.batch_size, p.tta)
        else:
            res = self.model.segment(image, p.channel_axis, p.diameter, p.options, p.tile_overlap, p.batch_size, p.tta)
        return res.masks, res.flows, res.cellprob, res.diameter


def _suffixes(save: Sequence[str]) -> tuple[str, ...]:
    unknown = set(save) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {sorted(OUTPUTS)}")
    return tuple(s for kind, s in OUTPUTS.items() if kind in ("masks", "cells") or kind in save)


VOLUME_OUTPUTS = ("masks", "cells")  # what a 3D run writes; the other outputs are 2D views


def check_volume_options(model: str | Path, save: Sequence[str], cp_names: Sequence[str] | None) -> None:
    """``InputError`` if a 3D run asks for the classical model or for an output that is 2D only."""
    if str(model) == "classic":
        raise InputError("model classic segments 2D images only; use a network for volumes (--do-3d)")
    flat = sorted(set(save) - set(VOLUME_OUTPUTS)) + (["cp-names"] if cp_names is not None else [])
    if flat:
        raise InputError(f"{', '.join(flat)}: 2D outputs, not written for volumes (--do-3d writes masks and cells)")


def segment_file(path: str | Path, out_dir: str | Path, segmenter: Segmenter, channel_axis: int | None = None,
                 save: Sequence[str] = (), cp_names: Sequence[str] | None = None, z_axis: int | None = None) -> ImageSummary:
    """Segment one image file and write ``<out_dir>/<stem>_masks.tif``, ``_cells.csv`` and the ``save``
    extras (``seg``, ``outlines``, ``rois``, ``geojson`` for QuPath). ``cp_names`` (channel names, may be
    empty) writes the cell table with CellProfiler's column names instead. ``z_axis`` (not None) marks
    the file as a volume for a 3D segmenter: (Z, Y, X) masks and a 3D cell table. Raises ``ValueError``
    naming the problem for a bad image."""
    from phenoscope.segment import outputs
    from phenoscope.segment.preprocess import to_yxc
    from phenoscope.segment.volume import to_zyxc

    path, out_dir = Path(path), Path(out_dir)
    _suffixes(save)
    image = imread(path)
    if z_axis is None:
        yxc = to_yxc(image, channel_axis, max_channels=image.size)  # validates axes; keeps all channels
    else:
        yxc = to_zyxc(image, z_axis, channel_axis)  # (Z, Y, X, C): the cell table's intensities
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        masks, flows, cellprob, diameter = segmenter(image)  # raises on NaN/inf (normalisation)
    stem = path.stem
    outputs.write_masks(out_dir / f"{stem}_masks.tif", masks)
    if cp_names is not None:
        from phenoscope.interop.cellprofiler import write_cp_cell_table

        table = write_cp_cell_table(out_dir / f"{stem}_cells.csv", masks, yxc, list(cp_names) or None)
    else:
        table = outputs.write_cell_table(out_dir / f"{stem}_cells.csv", masks, yxc, image_name=path.name)
    if "geojson" in save:
        from phenoscope.interop.geojson import write_geojson

        write_geojson(out_dir / f"{stem}_cells.geojson", masks, table,
                      label_column="label" if "label" in table else "Metadata_ObjectNumber")
    if "seg" in save:
        outputs.write_seg_npy(out_dir / f"{stem}_seg.npy", path, masks, flows, cellprob, diameter)
    if "outlines" in save:
        outputs.write_overlay_png(out_dir / f"{stem}_outlines.png", yxc, masks)
    if "rois" in save:
        outputs.write_imagej_rois(out_dir / f"{stem}_rois.zip", masks)
    notes = tuple(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    return ImageSummary(int(masks.max(initial=0)), None if diameter is None else float(diameter), notes)


@dataclass
class SegmentJob:
    """The per-item job of :func:`segment_files` (picklable: a process pool gets one copy per worker)."""

    segmenter: Segmenter
    out_dir: Path
    channel_axis: int | None = None
    save: tuple[str, ...] = ()
    cp_names: tuple[str, ...] | None = None
    z_axis: int | None = None  # volumes (3D segmenter)

    def __call__(self, item: Item) -> ImageSummary:
        return segment_file(item.source, self.out_dir, self.segmenter, self.channel_axis, self.save, self.cp_names,
                            self.z_axis)


def segment_files(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    model: str | Path = "default",
    params: SegmentParams = SegmentParams(),
    save: Sequence[str] = (),
    overwrite: bool = False,
    workers: int = 1,
    device: str | None = None,
    threads: int = 0,
    progress: bool | None = None,
    on_done: Callable[[Item, ImageSummary], str | None] | None = None,
    cp_names: Sequence[str] | None = None,
    scheduler: str | None = None,
) -> BatchReport:
    """Segment files, folders and globs into ``out_dir`` (see the module docstring); resumable.

    ``scheduler``: a dask.distributed scheduler address to run the files on (``"local"``: a LocalCluster of
    ``workers`` processes); the outputs are those of a serial run.

    Before any model is loaded, raises :class:`phenoscope.batch.InputError` for missing inputs,
    same-stem inputs, an unwritable ``out_dir``, a model file that does not exist, a manifest of
    another run, or (``params.do_3d``) the classical model or a 2D-only output. ``threads`` > 0 sets torch's CPU threads (in every worker process too). Per-file
    failures are in the report; SIGINT / SIGTERM raise ``BatchInterrupted``.
    """
    out_dir = Path(out_dir)
    files = collect_inputs(inputs, exclude=tuple(OUTPUTS.values()))
    check_writable(out_dir)
    items = plan(files, out_dir, _suffixes(save))
    if params.do_3d:
        check_volume_options(model, save, cp_names)
    manifest = manifest_for(model, params)
    check_manifest(out_dir, manifest, items, overwrite)
    if threads:
        _set_threads(threads)
    segmenter = load_segmenter(model, params, device)
    write_manifest(out_dir, manifest)
    job = SegmentJob(segmenter, out_dir, params.channel_axis, tuple(save), None if cp_names is None else tuple(cp_names),
                     params.z_axis if params.do_3d else None)
    executor = make_executor(workers, partial(_set_threads, threads) if threads else None, scheduler)
    return run_batch(items, job, executor, overwrite, progress, "segment", on_done)


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
