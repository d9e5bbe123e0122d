"""The learning-rate schedules of nbl-dist's training loops: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math


def lr_factor(schedule: str, warmup_steps: int, total_steps: int):
    """step -> multiplier of the peak learning rate: linear warm-up over warmup_steps, then cosine to 0, linear to 0
    or constant."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1 - progress
        return 1.0
    return factor
