"""Package structure: every subpackage declares ``__all__`` and every public name imports."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import phenoscope

SUBPACKAGES = sorted(m.name for m in pkgutil.iter_modules(phenoscope.__path__, "phenoscope.") if m.ispkg)


def test_the_expected_subpackages_exist():
    assert {"phenoscope.core", "phenoscope.datasets", "phenoscope.eval", "phenoscope.segment", "phenoscope.ssl",
            "phenoscope.train", "phenoscope.profiling", "phenoscope.cli"} <= set(SUBPACKAGES)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_declares_all_and_every_name_imports(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    assert module.__all__ == sorted(set(module.__all__), key=module.__all__.index), f"{name}.__all__ repeats a name"
    for public in module.__all__:
        assert getattr(module, public) is not None, f"{name}.{public}"
