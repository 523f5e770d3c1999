"""The one training loop (pluggable objectives), optimiser parameter groups and schedules."""

from phenoscope.train.loop import Progress, TrainConfig, setup_distributed, train
from phenoscope.train.optim import param_groups
from phenoscope.train.schedules import cosine_schedule, ema_update, step_schedule

__all__ = ["Progress", "TrainConfig", "cosine_schedule", "ema_update", "param_groups", "setup_distributed", "step_schedule", "train"]
