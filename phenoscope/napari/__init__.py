"""napari plugin (npe2 manifest ``napari.yaml``): a Segment widget, ``_seg.npy`` and OME-Zarr labels readers, label TIFF and
ROI zip writers, and the demo sample. Install with ``pip install 'phenoscope[napari]'``.

Public names
------------
SegmentWidget                    the "Segment" dock widget (Cellpose-SAM or classic, in a worker thread)
segment_image, recompute_masks   the widget's work, without Qt
read_seg_npy, read_ome_zarr_labels, get_reader   the readers
write_labels_tiff, write_labels_rois   the writers
sample_nuclei                    the sample data
"""

from phenoscope.napari.reader import get_reader, read_ome_zarr_labels, read_seg_npy
from phenoscope.napari.sample import sample_nuclei
from phenoscope.napari.writer import write_labels_rois, write_labels_tiff

__all__ = ["SegmentWidget", "get_reader", "read_ome_zarr_labels", "read_seg_npy", "recompute_masks", "sample_nuclei", "segment_image",
           "write_labels_rois", "write_labels_tiff"]


def __getattr__(name: str):
    # the widget module imports magicgui / Qt; keep the reader, writers and sample importable without them
    if name in ("SegmentWidget", "recompute_masks", "segment_image"):
        from phenoscope.napari import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'phenoscope.napari' has no attribute {name!r}")
