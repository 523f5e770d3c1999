"""Shared fixtures. Real data lives in ``phenoscope.datasets.data_root()`` (``$PHENOSCOPE_DATA``, else ``../shared/data``).

Tests that need it skip with a reason when it is absent, except under CI (``CI=true``),
where its absence is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from phenoscope.datasets import data_root

SHARED_DATA = data_root()


def require_data(*parts: str) -> Path:
    """Path to ``../shared/data/<parts>``; skip (or fail under CI) if it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        msg = f"shared data not found: {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (required under CI=true)")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def dsb_dir() -> Path:
    return require_data("dsb2018_train")


@pytest.fixture(scope="session")
def bbbc021_dir() -> Path:
    return require_data("bbbc021_profiles")


@pytest.fixture(scope="session")
def jurkat_dir() -> Path:
    return require_data("jurkat_cellcycle")
