"""Options shared by the training subcommands (``train``, ``pretrain``)."""

from __future__ import annotations

import argparse


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--resume`` and ``--threads``."""
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU thread count from ``--threads`` (0 keeps torch's default)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
