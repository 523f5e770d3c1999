"""CellProfiler-style per-cell tables: ``<Compartment>_AreaShape_*``, ``_Intensity_MeanIntensity_<channel>``,
``_Location_Center_X/Y``, plus ``Metadata_*`` columns, so that pycytominer's ``infer_cp_features`` and
its ``normalize`` / ``feature_select`` steps take the table as they take CellProfiler's.

Units are pixels (CellProfiler's own when no physical size is set); ``Orientation`` is in degrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from phenoscope.core.io import atomic_write

# skimage regionprops name → CellProfiler MeasureObjectSizeShape name
_SHAPE = {
    "area": "Area",
    "perimeter": "Perimeter",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "extent": "Extent",
    "euler_number": "EulerNumber",
    "axis_major_length": "MajorAxisLength",
    "axis_minor_length": "MinorAxisLength",
    "orientation": "Orientation",
}


def channel_names(n: int, names: Sequence[str] | None = None) -> list[str]:
    """``names`` checked against ``n`` channels, or ``C0 … C{n-1}``."""
    if not names:
        return [f"C{k}" for k in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} channel names given ({', '.join(names)}) for an image of {n} channel(s)")
    bad = [s for s in names if not s or not s.replace("_", "").isalnum()]
    if bad:
        raise ValueError(f"channel names must be letters, digits or '_' (CellProfiler image names), got {bad}")
    return list(names)


def cp_cell_table(
    masks: np.ndarray, image_yxc: np.ndarray, names: Sequence[str] | None = None, compartment: str = "Cells",
) -> pd.DataFrame:
    """One row per cell with CellProfiler column names.

    Args:
        masks: (H, W) integer labels, 0 = background.
        image_yxc: (H, W, C) raw intensities (not normalised).
        names: one name per channel (default ``C0, C1, …``).
        compartment: column prefix (``Cells``, ``Nuclei`` or ``Cytoplasm``: pycytominer's compartments).
    Returns:
        Columns ``Metadata_ObjectNumber`` (the label), ``<compartment>_AreaShape_{Area, Perimeter,
        FormFactor, Eccentricity, Solidity, Extent, EulerNumber, MajorAxisLength, MinorAxisLength,
        Orientation, Center_X, Center_Y, BoundingBoxMinimum_X/Y, BoundingBoxMaximum_X/Y}``,
        ``<compartment>_Intensity_MeanIntensity_<name>`` and ``<compartment>_Location_Center_X/Y``
        (px; x = column, y = row; bounding-box maxima exclusive, as CellProfiler).
    """
    from skimage.measure import regionprops_table

    names = channel_names(image_yxc.shape[-1], names)
    props = regionprops_table(
        masks.astype(np.int64, copy=False), intensity_image=image_yxc.astype(np.float32, copy=False),
        properties=("label", "centroid", "bbox", "intensity_mean", *_SHAPE),
    )
    p = f"{compartment}_"
    out = pd.DataFrame({"Metadata_ObjectNumber": props["label"].astype(np.int64)})
    for key, name in _SHAPE.items():
        out[f"{p}AreaShape_{name}"] = props[key]
    out[f"{p}AreaShape_Orientation"] = np.degrees(props["orientation"])
    perimeter = out[f"{p}AreaShape_Perimeter"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[f"{p}AreaShape_FormFactor"] = np.where(perimeter > 0, 4 * np.pi * props["area"] / perimeter**2, np.nan)
    out[f"{p}AreaShape_Center_X"] = props["centroid-1"]
    out[f"{p}AreaShape_Center_Y"] = props["centroid-0"]
    out[f"{p}AreaShape_BoundingBoxMinimum_X"] = props["bbox-1"]
    out[f"{p}AreaShape_BoundingBoxMinimum_Y"] = props["bbox-0"]
    out[f"{p}AreaShape_BoundingBoxMaximum_X"] = props["bbox-3"]
    out[f"{p}AreaShape_BoundingBoxMaximum_Y"] = props["bbox-2"]
    for k, name in enumerate(names):
        key = "intensity_mean" if len(names) == 1 and "intensity_mean" in props else f"intensity_mean-{k}"
        out[f"{p}Intensity_MeanIntensity_{name}"] = props[key]
    out[f"{p}Location_Center_X"] = props["centroid-1"]
    out[f"{p}Location_Center_Y"] = props["centroid-0"]
    return out


def write_cp_cell_table(
    path: str | Path, masks: np.ndarray, image_yxc: np.ndarray, names: Sequence[str] | None = None,
    compartment: str = "Cells",
) -> pd.DataFrame:
    """Write :func:`cp_cell_table` as CSV atomically and return it."""
    df = cp_cell_table(masks, image_yxc, names, compartment)
    with atomic_write(path, "w") as fh:
        df.to_csv(fh, index=False)
    return df
