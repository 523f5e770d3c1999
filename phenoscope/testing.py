"""Support for tests and benchmarks: importing the reference implementations we compare against.

``cellpose`` imports ``torchvision``. On CPU-only machines whose torchvision wheel was built for
CUDA, ``import torchvision`` fails while registering fake kernels for its compiled ops
(``torchvision::nms`` ...). None of the cellpose code paths we compare against uses those ops, so
``import_cellpose`` retries with those two registration modules stubbed out. Nothing here is used
at run time by phenoscope itself.
"""

from __future__ import annotations

import importlib
import sys
import types

_TV_REGISTRATIONS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def _import_torchvision() -> None:
    try:
        importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for name in _TV_REGISTRATIONS:
            sys.modules[name] = types.ModuleType(name)
        importlib.import_module("torchvision")


def import_cellpose() -> types.ModuleType:
    """Import the reference ``cellpose`` package (4.2.1.1) with its submodules loaded.

    Raises ``ImportError`` if cellpose is not installed (install the ``test`` extra).
    """
    _import_torchvision()
    cellpose = importlib.import_module("cellpose")
    for sub in ("dynamics", "metrics", "utils", "transforms", "vit", "models", "core"):
        importlib.import_module(f"cellpose.{sub}")
    return cellpose
