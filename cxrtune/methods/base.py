"""What every pretraining method gives the training loop.

A method owns its encoders, heads and method state (queue, EMA teacher, DINO centre) as modules
and buffers, so ``method.state_dict()`` is everything a checkpoint needs besides the optimiser.
It makes its own views from a uint8 batch (how many, of which size, is the method's business)
and returns its loss; the loop does the rest (optimiser, schedules, clipping, precision).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from cxrtune.augment import BatchAugment
from cxrtune.models.backbone import Backbone


@dataclass(frozen=True)
class Progress:
    """Where training stands, for per-step and per-epoch schedules."""

    epoch: int           # 0-based epoch in progress
    step: int            # global optimiser step, 0-based
    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))


def cosine_increase(start: float, end: float, fraction: float) -> float:
    """From ``start`` at fraction 0 to ``end`` at 1 along a half cosine (BYOL/DINO's EMA schedule)."""
    return end - (end - start) * (math.cos(math.pi * fraction) + 1) / 2


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy that follows ``module`` by exponential moving average."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` over parameters (not BN statistics)."""
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1 - momentum)


class SSLMethod(nn.Module):
    name: ClassVar[str] = ""  # set by @register_method

    @classmethod
    def check_config(cls, config) -> None:
        """Checks across the method's block and the engine's (``config``: a PretrainConfig);
        raise :class:`~cxrtune.errors.ConfigError` naming the keys."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def training_loss(self, images: torch.Tensor, augment: BatchAugment, progress: Progress) -> dict[str, torch.Tensor]:
        """``images``: uint8 (B, S, S) on the device. Returns at least ``{"loss": scalar}``."""
        raise NotImplementedError

    def before_optimizer_step(self, progress: Progress) -> None:
        """Hook between backward and the optimiser step (e.g. DINO freezes its last layer)."""

    def after_optimizer_step(self, progress: Progress) -> None:
        """Hook after each optimiser step (EMA updates of momentum encoders)."""

    def compile_encoders(self, compile_fn: Callable[[nn.Module], None]) -> None:
        """Compile the encoders in place; heads, queues and EMA code stay eager."""
        compile_fn(self.backbone.trunk)


class MomentumTargetMethod(SSLMethod):
    """A method with EMA copies of online modules (MoCo's key encoder, BYOL's target, DINO's
    teacher). ``targets`` pairs each copy's attribute with its online module's, the backbone
    first; :meth:`momentum_at` gives the momentum after a step."""

    targets: ClassVar[tuple[tuple[str, str], ...]] = ()

    def make_targets(self) -> None:
        """Create the copies (call once the online modules exist)."""
        for target, online in self.targets:
            setattr(self, target, momentum_copy(getattr(self, online)))

    def momentum_at(self, progress: Progress) -> float:
        raise NotImplementedError

    def after_optimizer_step(self, progress: Progress) -> None:
        momentum = self.momentum_at(progress)
        for target, online in self.targets:
            ema_update(getattr(self, target), getattr(self, online), momentum)

    def compile_encoders(self, compile_fn: Callable[[nn.Module], None]) -> None:
        compile_fn(self.backbone.trunk)
        compile_fn(getattr(self, self.targets[0][0]).trunk)


def embed_two_views(method: SSLMethod, images: torch.Tensor, augment: BatchAugment,
                    head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views through the backbone and ``head``, one forward pass per view, so each
    pass's BatchNorms see one view's statistics (as the reference code of BarlowTwins and VICReg)."""
    view_a, view_b = augment(images), augment(images)
    return head(method.backbone(view_a)), head(method.backbone(view_b))
