"""phenoscope: microscopy images → cells → embeddings → biological answers.

Subpackages
-----------
core       images, normalisation, tiling, atomic file output (shared by everything)
segment    Cellpose-SAM flows, dynamics, networks and the classical baseline
metrics    instance-segmentation metrics (cellpose AP, COCO/LIVECell AP)
ssl        self-supervised pretraining (DINOv2/Cell-DINO, SimCLR, MAE, MoCo)
profiling  aggregation, normalisation, sphering, batch correction, evaluation
"""

__version__ = "0.1.0"
