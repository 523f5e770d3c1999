"""Strict state-dict loading with a readable key diff (used by every checkpoint loader)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def key_diff(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], limit: int = 10) -> str:
    """Readable description of how ``given`` differs from ``expected`` (names and shapes); '' if equal."""

    def show(keys: list[str]) -> str:
        more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if tuple(expected[k].shape) != tuple(given[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {show(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {show(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {show(shapes)}")
    return "; ".join(parts)


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy ``state`` into ``module``; raise ``ValueError`` with a key diff unless names and shapes match exactly."""
    diff = key_diff(module.state_dict(), state)
    if diff:
        raise ValueError(f"{source} does not match {type(module).__name__}: {diff}")
    module.load_state_dict(state, strict=True)
