"""The SSL method registry: a method is one module that calls :func:`register` with a :class:`Method`.

A :class:`Method` names the objective, the dataclass of its options (the ``[<name>]`` section of a
pretraining config), the builder of its objective module and whether it trains on local crops.
The built-in methods are the modules listed in ``BUILTIN``; :func:`methods` imports them on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from phenoscope.nn.backbone import Backbone
from phenoscope.train.optim import param_groups

BUILTIN = ("phenoscope.ssl.dino", "phenoscope.ssl.simclr", "phenoscope.ssl.moco", "phenoscope.ssl.mae",
           "phenoscope.ssl.byol")

_REGISTRY: dict[str, Method] = {}


@dataclass(frozen=True)
class Method:
    """One self-supervised method.

    name: its name on the command line and its config section.
    config: dataclass of its options (all with defaults).
    build: ``build(backbone, options, global_size)`` → the objective module (``global_size``: side of
        the global views in pixels); the module exposes ``backbone`` (the network to export).
    local_crops: whether it trains on local crops (otherwise they are switched off).
    """

    name: str
    config: type
    build: Callable[[Backbone, Any, int], nn.Module]
    local_crops: bool = False


def register(method: Method) -> Method:
    """Add ``method`` to the registry (re-registering the same method is a no-op); returns it."""
    known = _REGISTRY.get(method.name)
    if known is not None and known != method:
        raise ValueError(f"SSL method {method.name!r} is already registered by {known.build.__module__}")
    _REGISTRY[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """Every registered method by name (the built-in ones first, in ``BUILTIN`` order)."""
    for module in BUILTIN:
        importlib.import_module(module)
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    """The method called ``name``; ``ValueError`` listing the known ones otherwise."""
    known = methods()
    if name not in known:
        raise ValueError(f"unknown method {name!r}; choose from {tuple(known)}")
    return known[name]


class Objective(nn.Module):
    """Base of the single-network objectives: ``backbone`` is trained, its ``mask_token`` (unused) frozen,
    default parameter groups (no weight decay on biases, norms and tokens)."""

    backbone: Backbone

    def _freeze_mask_token(self) -> None:
        self.backbone.mask_token.requires_grad_(False)

    def param_groups(self) -> list[dict]:
        return param_groups(self.named_parameters())
