"""Self-supervised pretraining for cell images: Cell-DINO (DINOv2) and SimCLR / MAE / MoCo v3 baselines."""
