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


def step_schedule(step: int, steps_per_epoch: int, epochs: int, base: float, warmup: int = 0, decay_epochs: int = -1) -> float:
    """cellpose ``train_seg`` learning rate: linear warm-up (``warmup`` steps), constant, then 10 halvings.

    The halvings are spread evenly over the last ``decay_epochs`` epochs; ``-1`` follows cellpose
    (the last 100 epochs if ``epochs > 300``, the last 50 if ``epochs > 99``, else none).
    """
    if step < warmup:
        return base * step / warmup
    if decay_epochs < 0:
        decay_epochs = 100 if epochs > 300 else 50 if epochs > 99 else 0
    if decay_epochs == 0:
        return base
    into = step / max(steps_per_epoch, 1) - (epochs - decay_epochs)  # epochs into the decay phase
    if into < 0:
        return base
    return base / 2 ** (1 + min(int(into * 10 / decay_epochs), 9))
