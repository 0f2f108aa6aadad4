"""DINO's self-distillation loss with a centred, sharpened teacher (Caron et al. 2021).

"H(P_t(x), P_s(x')) ... P_t = softmax((g_t(x) - c) / tau_t)" summed over every pair of a teacher
view (global crops only) and a *different* student view, averaged over pairs. Centring (c, an EMA
of the teacher's batch mean) stops one dimension dominating; a low teacher temperature sharpens
and so stops the uniform collapse that centring alone would favour.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def dino_loss(student_outputs: Sequence[torch.Tensor], teacher_outputs: Sequence[torch.Tensor],
              center: torch.Tensor, student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """Mean cross-entropy over (teacher view i, student view j != i) pairs.

    ``student_outputs``: one (B, K) tensor per view, global views first; ``teacher_outputs``: one
    per global view; ``center``: (K,) or (1, K).
    """
    if len(teacher_outputs) > len(student_outputs):
        raise ValueError("the student must see at least the teacher's views")
    teacher_probs = [F.softmax((t.float() - center) / teacher_temperature, dim=-1).detach() for t in teacher_outputs]
    student_logp = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student_outputs]
    total, pairs = 0.0, 0
    for i, q in enumerate(teacher_probs):
        for j, logp in enumerate(student_logp):
            if i == j:
                continue
            total = total + (-(q * logp).sum(dim=-1)).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("DINO needs at least two views")
    return total / pairs


@torch.no_grad()
def teacher_entropy(teacher_outputs: Sequence[torch.Tensor], center: torch.Tensor,
                    teacher_temperature: float) -> torch.Tensor:
    """Mean entropy (nats) of the centred, sharpened teacher distributions over views and batch.

    Its maximum, ln(out_dim), is a uniform output: DINO's collapse, in which every image gets the
    same flat distribution and the loss sits at about ln(out_dim) (the study's 5.42 against
    ln 256 = 5.55). A teacher that separates images stays well below it."""
    logits = (torch.cat([t.float() for t in teacher_outputs]) - center) / teacher_temperature
    return -(F.softmax(logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher_outputs: Sequence[torch.Tensor], momentum: float) -> torch.Tensor:
    """``momentum * center + (1 - momentum) * mean of the teacher outputs over views and batch``."""
    batch_mean = torch.cat([t.float() for t in teacher_outputs]).mean(dim=0, keepdim=True)
    return center * momentum + batch_mean * (1 - momentum)


class DinoLoss(nn.Module):
    """Holds the centre as a buffer (so it is checkpointed) and updates it after each loss."""

    def __init__(self, out_dim: int, student_temperature: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_outputs: Sequence[torch.Tensor], teacher_outputs: Sequence[torch.Tensor],
                teacher_temperature: float) -> dict[str, torch.Tensor]:
        loss = dino_loss(student_outputs, teacher_outputs, self.center, self.student_temperature, teacher_temperature)
        uniform = math.log(self.center.shape[-1])
        # how close to a uniform output (1 = uniform: collapsed), read by the collapse guard (cxrtune.health)
        entropy_ratio = teacher_entropy(teacher_outputs, self.center, teacher_temperature) / uniform
        if self.training:
            self.center.copy_(updated_center(self.center, teacher_outputs, self.center_momentum))
        return {"loss": loss, "teacher_entropy_ratio": entropy_ratio, "loss_uniform_ratio": loss.detach() / uniform}
