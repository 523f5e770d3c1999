"""Where the shared data sets live: ``$PHENOSCOPE_DATA``, else ``shared/data`` beside the source checkout."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PHENOSCOPE_DATA"


def data_root() -> Path:
    """Folder holding ``dsb2018_train/``, ``bbbc021_profiles/`` and ``jurkat_cellcycle/`` (may not exist).

    ``$PHENOSCOPE_DATA`` if set, else ``../shared/data`` beside the repository that holds this package.
    """
    env = os.environ.get(ENV)
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def dataset_path(*parts: str) -> Path:
    """``data_root() / parts``; raises ``FileNotFoundError`` naming the path and ``$PHENOSCOPE_DATA`` if absent."""
    path = data_root().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data set not found (set ${ENV} to the folder holding it)")
    return path
