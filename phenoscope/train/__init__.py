"""The one training loop (pluggable objectives), optimiser parameter groups, schedules and the L2-SP regulariser."""

from phenoscope.train.l2sp import L2SP, l2sp_param_groups
from phenoscope.train.loop import Progress, TrainConfig, setup_distributed, train
from phenoscope.train.optim import param_groups
from phenoscope.train.schedules import cosine_schedule, ema_update, step_schedule

__all__ = ["L2SP", "Progress", "TrainConfig", "cosine_schedule", "ema_update", "l2sp_param_groups", "param_groups", "setup_distributed", "step_schedule", "train"]
