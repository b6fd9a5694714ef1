"""Cohort -> slice store -> trainer -> model directory: configuration, augmentation, losses, checkpoints, the trainer
and the run."""
