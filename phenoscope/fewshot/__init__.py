"""CUPre few-shot segmentation (cross-domain pretraining under L2-SP): the benchmark split, the AMT²
phase schedule, the ``phenoscope fewshot`` grid for the flow model, its report, and the Mask R-CNN path
(:mod:`phenoscope.fewshot.maskrcnn`, imported on use: it needs torchvision)."""

from phenoscope.fewshot.amt2 import Phase, amt2_schedule, is_backbone
from phenoscope.fewshot.grid import INITS, FewShotConfig, check_inputs, evaluate, run_grid
from phenoscope.fewshot.split import FewShotSplit, cross_domain_split, labelled_subset, target_split, write_split
from phenoscope.train.l2sp import L2SP, l2sp_param_groups

__all__ = ["INITS", "FewShotConfig", "FewShotSplit", "L2SP", "Phase", "amt2_schedule", "check_inputs", "cross_domain_split",
           "evaluate", "is_backbone", "l2sp_param_groups", "labelled_subset", "run_grid", "target_split",
           "write_split"]
