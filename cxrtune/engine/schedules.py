"""Learning-rate schedules, pure functions of the global step (a resume only needs the step count).

- ``cosine``: linear warmup from 0, then a half cosine to ``min_ratio * peak`` at the last step;
- ``wsd`` (warmup-stable-decay): linear warmup, then the peak until the end; the decay happens on
  cooldown branches (:mod:`cxrtune.engine.cooldown`), never on the main trajectory.
"""

from __future__ import annotations

import math


class WarmupCosine:
    name = "cosine"

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


class WarmupStable(WarmupCosine):
    """Warmup, then the peak learning rate to the end (the stable phase of warmup-stable-decay)."""

    name = "wsd"

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        return self.peak_lr


def cooldown_lr(start_lr: float, floor: float, k: int, n: int, shape: str = "sqrt") -> float:
    """The learning rate of step ``k`` (0-based) of an ``n``-step cooldown from ``start_lr`` to
    ``floor``: ``1 - sqrt(x)`` or ``1 - x`` of the midpoint fraction ``x = (k + 0.5) / n``, so no
    step runs at the start rate or at the floor itself."""
    if not 0 <= k < n:
        raise ValueError(f"cooldown step {k} is outside 0..{n - 1}")
    x = (k + 0.5) / n
    keep = 1 - math.sqrt(x) if shape == "sqrt" else 1 - x
    return floor + (start_lr - floor) * keep


def build_schedule(kind: str, peak_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> WarmupCosine:
    schedules = {"cosine": WarmupCosine, "wsd": WarmupStable}
    return schedules[kind](peak_lr, warmup_steps, total_steps, min_ratio)
