"""CUPre few-shot segmentation (cross-domain pretraining under L2-SP): the benchmark split, the L2-SP
regulariser and the AMT² phase schedule."""

from phenoscope.fewshot.amt2 import Phase, amt2_schedule, is_backbone, phase_setup
from phenoscope.fewshot.l2sp import L2SP, l2sp_param_groups
from phenoscope.fewshot.split import FewShotSplit, cross_domain_split, labelled_subset, write_split

__all__ = ["FewShotSplit", "L2SP", "Phase", "amt2_schedule", "is_backbone", "phase_setup", "cross_domain_split", "l2sp_param_groups", "labelled_subset", "write_split"]
