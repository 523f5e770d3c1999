"""Per-step schedules (dinov2 ``CosineScheduler`` semantics) and EMA updates."""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_schedule(step: int, total: int, start: float, end: float, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up ``warmup_start → start`` over ``warmup`` steps, then cosine ``start → end``.

    After ``total`` steps the value stays at ``end``.
    """
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    span = max(total - warmup, 1)
    t = min(step - warmup, span) / span
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """``start → end`` linearly over ``warmup`` steps, then ``end`` (DINO teacher temperature)."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``θ_t ← m θ_t + (1 - m) θ_s`` for matching parameters (same names and order)."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1 - momentum)
