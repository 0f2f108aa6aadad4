"""LARS: SGD with momentum and a layer-wise trust ratio (You, Gitman and Ginsburg, 2017).

The form used by BarlowTwins' and SimCLR's reference code: for each parameter tensor ``p`` with
gradient ``g``, weight decay is added first (``g + wd * p``), then, where the group adapts, the
update is scaled by ``eta * |p| / |g + wd * p|`` (1 where either norm is zero), then momentum
``mu = momentum * mu + update`` and ``p -= lr * mu``. Biases and normalisation weights (1-D
tensors) neither adapt nor, by convention, decay: ``build_optimizer`` puts them in a group with
``adapt=False`` (and no decay when ``optim.exclude_norm_bias_decay``).

Large-batch SSL on GPUs (BarlowTwins at batch 2048, DINO with ViTs) relies on it; at the study's
batch sizes SGD is the default. The state (one momentum buffer per tensor) is in
``state_dict()``, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Iterable

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a per-tensor trust ratio; param groups may set ``adapt=False``."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, adapt: bool = True):
        if lr <= 0:
            raise ValueError(f"LARS lr = {lr} must be > 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum = {momentum} must lie in [0, 1)")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay = {weight_decay} must be >= 0")
        if eta <= 0:
            raise ValueError(f"LARS eta = {eta} (trust coefficient) must be > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, adapt=adapt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["weight_decay"]:
                    update = update.add(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm, torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss
