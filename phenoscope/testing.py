"""Support for tests and benchmarks: importing the reference implementations we compare against.

``cellpose`` imports ``torchvision``; see :func:`phenoscope.core.compat.import_torchvision` for the
CPU-only fix. Nothing here is used at run time by phenoscope itself.
"""

from __future__ import annotations

import importlib
import types

from phenoscope.core.compat import import_torchvision

def import_cellpose() -> types.ModuleType:
    """Import the reference ``cellpose`` package (4.2.1.1) with its submodules loaded.

    Raises ``ImportError`` if cellpose is not installed (install the ``test`` extra).
    """
    import_torchvision()
    cellpose = importlib.import_module("cellpose")
    for sub in ("dynamics", "metrics", "utils", "transforms", "vit", "models", "core"):
        importlib.import_module(f"cellpose.{sub}")
    return cellpose
