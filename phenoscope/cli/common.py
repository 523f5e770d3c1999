"""Options shared by the subcommands, and lazy choices that keep building the parser light."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator

__all__ = ["LazyChoices", "add_run_options", "apply_threads"]


class LazyChoices:
    """argparse ``choices`` read from ``module.attribute`` only when an argument is checked or its
    subcommand's help is shown (give the argument a ``metavar`` so adding it reads nothing)."""

    def __init__(self, module: str, attribute: str) -> None:
        self.module, self.attribute = module, attribute

    def _values(self) -> tuple:
        return tuple(getattr(importlib.import_module(self.module), self.attribute))

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self) -> Iterator:
        return iter(self._values())


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--resume`` and ``--threads``."""
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU thread count from ``--threads`` (0 keeps torch's default)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
