"""QuPath-compatible GeoJSON: one ``Feature`` per cell of a label image.

QuPath's convention (its ``File → Export objects as GeoJSON`` and import): a ``FeatureCollection`` of
``Feature`` objects whose ``geometry`` is a ``Polygon`` (or ``MultiPolygon``) in pixel units with the
origin at the top-left corner of the image (pixel ``(r, c)`` covers ``[c, c + 1] × [r, r + 1]``), and
whose ``properties`` hold ``objectType`` (``"detection"`` for cells), an optional ``name``, an optional
``classification`` (``{"name": ...}``) and ``measurements`` (a name → number mapping).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from phenoscope.core.io import atomic_write

# table columns that describe the object rather than measure it
_NOT_MEASUREMENTS = ("label", "Metadata_ObjectNumber")


def _ring_area(ring: np.ndarray) -> float:
    """Signed (shoelace) area of an (N, 2) closed ring, in px²."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _inside(ring: np.ndarray, point: np.ndarray) -> bool:
    from matplotlib.path import Path as MplPath

    return bool(MplPath(ring).contains_point(point))


def label_polygon(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> dict | None:
    """GeoJSON geometry of one boolean (H, W) mask, or None if it is empty.

    The rings run through the midpoints between inside and outside pixel centres (marching squares at
    level 0.5, diagonal neighbours joined), so a pixel is inside the polygon exactly when it is in the
    mask. Coordinates are (x, y) in px, shifted by ``offset`` (row, col) and by half a pixel to QuPath's
    corner-origin convention. Several components give a ``MultiPolygon``; holes are interior rings.
    """
    from skimage.measure import find_contours

    if not mask.any():
        return None
    padded = np.pad(mask, 1).astype(np.uint8)
    shift = np.array([offset[1] - 0.5, offset[0] - 0.5])  # (x, y): undo the pad, then to pixel corners
    rings = [c[:, ::-1] + shift for c in find_contours(padded, 0.5, fully_connected="high")]
    rings = [r if np.array_equal(r[0], r[-1]) else np.vstack([r, r[:1]]) for r in rings]
    areas = [_ring_area(r) for r in rings]
    outer_sign = math.copysign(1.0, areas[int(np.argmax(np.abs(areas)))])
    shells = [r for r, a in zip(rings, areas) if math.copysign(1.0, a) == outer_sign]
    holes = [r for r, a in zip(rings, areas) if math.copysign(1.0, a) != outer_sign]
    polygons: list[list[np.ndarray]] = [[s] for s in shells]
    for hole in holes:
        owner = next((p for p in polygons if _inside(p[0], hole[0])), polygons[0])
        owner.append(hole)
    coords = [[np.round(r, 3).tolist() for r in p] for p in polygons]
    if len(coords) == 1:
        return {"type": "Polygon", "coordinates": coords[0]}
    return {"type": "MultiPolygon", "coordinates": coords}


def _number(value: object) -> float | int | None:
    """A JSON number for a table cell (None for NaN)."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def cell_features(
    masks: np.ndarray, table: pd.DataFrame | None = None, classes: Mapping[int, str] | None = None,
    label_column: str = "label",
) -> list[dict]:
    """One QuPath detection ``Feature`` per label of an (H, W) label image.

    Args:
        masks: (H, W) integer labels, 0 = background.
        table: optional per-cell table (one row per label, keyed by ``label_column``); its numeric
            columns become ``properties.measurements``.
        classes: optional label → class name, written as ``properties.classification``.
    Returns:
        Features in label order; ``properties.name`` is the label.
    """
    from scipy.ndimage import find_objects

    rows: dict[int, dict] = {}
    if table is not None:
        numeric = [c for c in table.columns if c not in _NOT_MEASUREMENTS and pd.api.types.is_numeric_dtype(table[c])]
        for label, row in zip(table[label_column].astype(int), table[numeric].itertuples(index=False)):
            rows[label] = {k: _number(v) for k, v in zip(numeric, row)}
    features = []
    for label, sl in enumerate(find_objects(masks), start=1):
        if sl is None:
            continue
        geometry = label_polygon(masks[sl] == label, (sl[0].start, sl[1].start))
        properties: dict = {"objectType": "detection", "name": str(label)}
        if classes is not None and label in classes:
            properties["classification"] = {"name": str(classes[label])}
        properties["measurements"] = rows.get(label, {})
        features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    return features


def write_geojson(
    path: str | Path, masks: np.ndarray, table: pd.DataFrame | None = None,
    classes: Mapping[int, str] | None = None, label_column: str = "label",
) -> int:
    """Write a QuPath-importable ``FeatureCollection`` of the cells of ``masks`` atomically; returns the count."""
    features = cell_features(masks, table, classes, label_column)
    with atomic_write(path, "w") as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh, separators=(",", ":"))
    return len(features)
