"""Shared core: image I/O and the channel-axis rule, normalisation, tiling, atomic output, checkpoints.

The checkpoint names import torch and load on first use, so ``import phenoscope.core`` stays light.
"""

from phenoscope.core.axes import channels_first, channels_last, guess_channel_axis
from phenoscope.core.io import atomic_path, atomic_write, imread, imwrite_tiff
from phenoscope.core.normalize import normalize_percentile

_CHECKPOINT = ("Checkpoint", "Preprocessing", "read_checkpoint", "save_checkpoint")

__all__ = [
    "Checkpoint",
    "Preprocessing",
    "atomic_path",
    "atomic_write",
    "channels_first",
    "channels_last",
    "guess_channel_axis",
    "imread",
    "imwrite_tiff",
    "normalize_percentile",
    "read_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str):
    if name in _CHECKPOINT:
        from phenoscope.core import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'phenoscope.core' has no attribute {name!r}")
