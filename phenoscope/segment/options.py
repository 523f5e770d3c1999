"""How flows become masks: the one set of dynamics options, shared by the API, the CLI and training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MaskOptions:
    """Options of :func:`phenoscope.segment.compute_masks` (cellpose's names and defaults).

    flow_threshold: masks whose flow error exceeds it are removed (2D; 0 disables the QC).
    cellprob_threshold: pixels with cellprob logit above it are followed.
    min_size: masks smaller than this many pixels are removed (≤ 0 keeps all).
    max_size_fraction: masks covering more than this fraction of the image are removed.
    """

    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    max_size_fraction: float = 0.4

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of ``compute_masks``."""
        return dataclasses.asdict(self)
