"""Training and fine-tuning of Cellpose-SAM networks: data (pairs, cached flows, tiles), the paper's
augmentations, the cellpose objective, and :func:`train_segmentation` over the one training loop."""

from phenoscope.segment.training.augment import SegAugmentConfig, augment_sample
from phenoscope.segment.training.data import (
    Sample,
    SegmentationDataset,
    find_pairs,
    load_training_image,
    read_pairs,
    split_pairs,
    to_samples,
)
from phenoscope.segment.training.objective import CellposeLoss, cellpose_loss, validate
from phenoscope.segment.training.run import SegLoopConfig, SegTrainConfig, initial_network, train_segmentation

__all__ = [
    "CellposeLoss",
    "SegAugmentConfig",
    "SegLoopConfig",
    "SegTrainConfig",
    "Sample",
    "SegmentationDataset",
    "augment_sample",
    "cellpose_loss",
    "find_pairs",
    "initial_network",
    "load_training_image",
    "read_pairs",
    "split_pairs",
    "to_samples",
    "train_segmentation",
    "validate",
]
