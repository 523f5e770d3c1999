"""Shared core: image I/O, normalisation, tiling, atomic output."""

from phenoscope.core.io import atomic_write, imread, imwrite_tiff
from phenoscope.core.normalize import normalize_percentile

__all__ = ["atomic_write", "imread", "imwrite_tiff", "normalize_percentile"]
