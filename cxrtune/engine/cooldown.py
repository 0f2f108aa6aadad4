"""Cooldown branches: how a warmup-stable-decay (``optim.schedule = "wsd"``) run is judged.

The main trajectory warms up and then trains at its peak learning rate. Each checkpoint is judged on
a *branch*: the run's state is copied, trained for ``optim.cooldown_fraction`` of the steps done so
far with the learning rate decaying from its current value to ``min_lr_ratio`` times the peak
(``1 - sqrt`` or linear), and the branch's backbone is what the checkpoint offers for probing and
export. The state is then put back, so a judgement never changes the main trajectory: a trial
judged at epoch 5 and promoted to epoch 20 continues as if it had not been judged, and its
judgement does not depend on how long it would have trained. The branch draws its own views and
batch order (seeded by the epoch), so it touches no random stream of the main run either.

The schedule and the length of the cooldown follow Hu et al. (2024), "MiniCPM: Unveiling the
Potential of Small Language Models with Scalable Training Strategies" (warmup-stable-decay) and
Hägele et al. (2024), "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"
(a cooldown of 10-20 % of the steps matches a cosine schedule of the same length; the 1 - sqrt
shape does best). The price: a branch at epoch r costs ``cooldown_fraction * r`` epochs of compute,
and the copy holds the method's and optimiser's state a second time in memory.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterator

import torch

from cxrtune.engine.schedules import cooldown_lr
from cxrtune.errors import DivergenceError
from cxrtune.methods import Progress, SSLMethod


def cooldown_steps(fraction: float, steps_done: int) -> int:
    """Steps of the branch judged after ``steps_done`` main steps (at least one)."""
    return max(1, round(fraction * steps_done))


def run_cooldown(method: SSLMethod, optimizer: torch.optim.Optimizer, batches: Iterator[torch.Tensor],
                 augment, where: Progress, start_lr: float, floor: float, steps: int, shape: str,
                 step_fn: Callable, use_bf16: bool, device: torch.device, *,
                 check_every: int = 1) -> tuple[dict[str, torch.Tensor], float]:
    """Train a branch of ``steps`` steps from the current state, then restore that state.

    Returns the branch's backbone (torchvision key names, on the CPU) and its mean loss.
    ``step_fn(method, optimizer, loss, where)`` is the engine's optimiser step. The loss is read on
    the host (a device sync) every ``check_every`` steps and at the last, as in the main loop; a
    non-finite loss raises :class:`DivergenceError` naming the first step checked that shows it.
    """
    saved_method = copy.deepcopy(method.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    total = torch.zeros((), device=device)
    try:
        for k in range(steps):
            lr = cooldown_lr(start_lr, floor, k, steps, shape)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = method.training_loss(next(batches), augment, where)["loss"]
            total += loss.detach().float()
            if (k + 1) % check_every == 0 or k == steps - 1:
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise DivergenceError(f"{method.name}: the loss became {value} at step {k + 1} of the cooldown "
                                          f"branch after epoch {where.epoch + 1} (lr {lr:.3g})",
                                          epoch=where.epoch + 1, loss=value)
            step_fn(method, optimizer, loss, where)
        judged = {k: v.detach().cpu().clone() for k, v in method.backbone.torchvision_state_dict().items()}
    finally:
        method.load_state_dict(saved_method)
        optimizer.load_state_dict(saved_optimizer)
    return judged, float(total) / steps
