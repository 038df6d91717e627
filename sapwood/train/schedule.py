"""Learning-rate schedule: linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """A picklable multiplier for ``LambdaLR`` (base lr = ``lr``)."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, steps: int):
        self.lr, self.min_lr, self.warmup_steps, self.steps = lr, min_lr, warmup_steps, steps

    def __call__(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup_steps, self.steps) / self.lr


def warmup_cosine(optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_steps: int, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(lr, min_lr, warmup_steps, steps))
