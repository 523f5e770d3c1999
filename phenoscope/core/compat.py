"""Compatibility fixes needed at run time.

``import_torchvision``: on CPU-only machines whose torchvision wheel was built for CUDA,
``import torchvision`` (pulled in by timm and cellpose) fails while registering fake kernels for
its compiled ops (``torchvision::nms`` ...). phenoscope uses none of those ops, so the import is
retried with the two registration modules stubbed out.
"""

from __future__ import annotations

import importlib
import sys
import types

_TV_REGISTRATIONS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_torchvision() -> None:
    """Import torchvision, tolerating a CUDA-only build of its compiled ops (see module docstring)."""
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
