"""Loaders for the public data sets we develop and evaluate on, and a generated sample.

``data_root()`` is ``$PHENOSCOPE_DATA`` or ``../shared/data`` beside the source checkout.
"""

from phenoscope.datasets.bbbc021 import is_bbbc021_source, load_bbbc021
from phenoscope.datasets.dsb import dsb_image, dsb_index, dsb_labels, image_mosaic, label_mosaic
from phenoscope.datasets.jurkat import load_jurkat
from phenoscope.datasets.root import data_root, dataset_path
from phenoscope.datasets.synthetic import synthetic_nuclei

__all__ = [
    "data_root",
    "dataset_path",
    "dsb_image",
    "dsb_index",
    "dsb_labels",
    "is_bbbc021_source",
    "image_mosaic",
    "label_mosaic",
    "load_bbbc021",
    "load_jurkat",
    "synthetic_nuclei",
]
