"""Outputs for the tools users already work in: QuPath GeoJSON, CellProfiler-style tables, bioimage.io models.

Public names
------------
write_geojson(path, masks, table)           QuPath detections, one GeoJSON Feature per cell
cell_features(masks, table)                 the same Features as Python dicts
cp_cell_table(masks, image_yxc, names)      per-cell table with CellProfiler column names
write_cp_cell_table(path, masks, image_yxc) the same, written as CSV
export_bioimageio(model, out)               a bioimage.io (format 0.5) model package (needs phenoscope[bioimageio])
"""

from phenoscope.interop.cellprofiler import cp_cell_table, write_cp_cell_table
from phenoscope.interop.geojson import cell_features, write_geojson

__all__ = ["cell_features", "cp_cell_table", "export_bioimageio", "write_cp_cell_table", "write_geojson"]


def __getattr__(name: str):
    # bioimageio.spec and torch load only when an export is asked for
    if name == "export_bioimageio":
        from phenoscope.interop.bioimageio import export_bioimageio

        return export_bioimageio
    raise AttributeError(f"module 'phenoscope.interop' has no attribute {name!r}")
