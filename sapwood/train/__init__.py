"""Training: the loop, tasks, precision, activation checkpointing, checkpoints with exact resume."""
