"""phenoscope: microscopy images → cells → embeddings → biological answers.

Subpackages
-----------
core       images and axes, normalisation, tiling, atomic file output, checkpoints (shared by everything)
nn         the backbone protocol that the SSL and segmentation encoders implement
train      the one training loop with pluggable objectives
eval       segmentation metrics (cellpose AP, COCO/LIVECell AP) and frozen-feature probes
datasets   loaders for the public data sets we develop on, and a generated sample
segment    Cellpose-SAM flows, dynamics, networks, tiled inference, training, classical baseline
ssl        self-supervised pretraining (DINOv2/Cell-DINO, SimCLR, MAE, MoCo) and embeddings
profiling  aggregation, normalisation, sphering, batch correction, evaluation
batch      one runner for per-file jobs (skip done outputs, report failures, resume)
cli        the ``phenoscope`` command, a thin layer over the above
"""

__version__ = "0.1.0"
