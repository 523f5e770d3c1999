"""napari sample data: the generated demo image of ``phenoscope demo`` (deterministic, nothing downloaded)."""

from __future__ import annotations

import numpy as np


def sample_nuclei() -> list[tuple[np.ndarray, dict, str]]:
    """The (512, 512) uint16 synthetic nuclei image (``phenoscope.datasets.synthetic_nuclei(seed=0)``)."""
    from phenoscope.datasets import synthetic_nuclei

    image, _ = synthetic_nuclei(seed=0)
    return [(image, {"name": "nuclei"}, "image")]
