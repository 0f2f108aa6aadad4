"""Learning-rate schedule: linear warmup from 0, then a half cosine to ``min_ratio * peak``.

A pure function of the global step, so resuming only needs the step count.
"""

from __future__ import annotations

import math


class WarmupCosine:
    def __init__(self, peak_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps = {total_steps} must be >= 1")
        self.peak_lr = peak_lr
        self.warmup_steps = max(0, min(warmup_steps, total_steps))
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.step = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.peak_lr * self.min_ratio
        return floor + (self.peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
