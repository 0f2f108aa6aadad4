"""MoCo v2's InfoNCE against a queue of negatives, plus a variance hinge against collapse.

InfoNCE (He et al. 2020): "a query q and a matching key k+ ... the loss is
-log exp(q.k+/t) / (exp(q.k+/t) + sum_k- exp(q.k-/t))", with q, k L2-normalised and the negatives
taken from a queue of past keys.

The variance hinge (VICReg's variance term, Bardes et al. 2022) is
``mean_d relu(target - sqrt(var_batch(z_d) + eps))``. It is applied to the *un-normalised*
projections: on L2-normalised z the mean per-dimension std is at most 1/sqrt(d) (0.088 at d=128),
so a hinge at 1 could never be met there and would only push all dimensions equally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxrtune.errors import ConfigError


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE of L2-normalised ``query`` (B, d) against ``key`` (B, d) and ``queue`` (K, d).

    The positive of query i is key i; the negatives are every row of the queue (not the other
    keys of the batch, as in MoCo).
    """
    if query.ndim != 2 or query.shape != key.shape:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must both be (batch, dim)")
    if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue {tuple(queue.shape)} must be (length, {query.shape[1]})")
    positive = (query * key).sum(dim=1, keepdim=True)
    negatives = query @ queue.t()
    logits = torch.cat([positive, negatives], dim=1) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits.float(), labels)


def variance_hinge(z: torch.Tensor, target: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``mean_d relu(target - sqrt(var(z[:, d]) + eps))`` with the unbiased batch variance."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"z {tuple(z.shape)} must be (batch >= 2, dim)")
    std = torch.sqrt(z.float().var(dim=0) + eps)
    return F.relu(target - std).mean()


class MocoLoss(nn.Module):
    """InfoNCE(q, k, queue) + ``variance_weight`` * variance_hinge(raw q); weight 0 is plain MoCo."""

    def __init__(self, temperature: float = 0.07, variance_weight: float = 1.0,
                 variance_target: float = 1.0, variance_eps: float = 1e-4) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"temperature = {temperature} must be > 0")
        if variance_weight < 0:
            raise ConfigError(f"variance_weight = {variance_weight} must be >= 0 (0 = plain MoCo)")
        self.temperature = temperature
        self.variance_weight = variance_weight
        self.variance_target = variance_target
        self.variance_eps = variance_eps

    def forward(self, query_raw: torch.Tensor, key: torch.Tensor, queue: torch.Tensor) -> dict[str, torch.Tensor]:
        """``query_raw``: un-normalised query projections; ``key``, ``queue``: normalised keys."""
        contrastive = info_nce(F.normalize(query_raw.float(), dim=1), key.float(), queue, self.temperature)
        variance = variance_hinge(query_raw, self.variance_target, self.variance_eps)
        return {"loss": contrastive + self.variance_weight * variance,
                "infonce": contrastive.detach(), "variance": variance.detach()}
