"""Projection and prediction heads shared by the methods."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, widths: Sequence[int], batch_norm: bool, bias: bool = True,
        activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear(-BN)-activation blocks, then a plain Linear to ``widths[-1]``."""
    layers: list[nn.Module] = []
    dims = [in_dim, *widths]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(widths) - 1
        layers.append(nn.Linear(a, b, bias=bias and (last or not batch_norm)))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(activation())
    return nn.Sequential(*layers)


class DinoHead(nn.Module):
    """DINO's head: 3-layer MLP (GELU) to a bottleneck, L2 normalisation, then a weight-normalised
    linear layer without bias whose row norms are fixed to 1 ("norm_last_layer", which the DINO
    authors found stabilises training)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, (hidden_dim, hidden_dim, bottleneck_dim), batch_norm=False, activation=nn.GELU)
        self.last_layer = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_layer, std=0.02)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return x @ F.normalize(self.last_layer, dim=1).t()
