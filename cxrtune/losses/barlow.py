"""BarlowTwins (Zbontar et al. 2021).

"C_ij = sum_b z^A_bi z^B_bj / (sqrt(sum_b (z^A_bi)^2) sqrt(sum_b (z^B_bj)^2))" on batch-normalised
projections; loss = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2. The reference code
standardises each projection dimension with a BatchNorm without affine parameters (training
mode: batch mean, biased batch variance, eps 1e-5) and divides z_A^T z_B by the batch size; this
function does exactly that, so no BatchNorm module (and no running statistics) is needed.
"""

from __future__ import annotations

import torch


def _standardise(z: torch.Tensor, eps: float) -> torch.Tensor:
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The (d, d) cross-correlation of two batches of projections, as in the reference code."""
    if z_a.ndim != 2 or z_a.shape != z_b.shape or z_a.shape[0] < 2:
        raise ValueError(f"z_a {tuple(z_a.shape)} and z_b {tuple(z_b.shape)} must both be (batch >= 2, dim)")
    z_a, z_b = _standardise(z_a.float(), eps), _standardise(z_b.float(), eps)
    return z_a.t() @ z_b / z_a.shape[0]


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambda_offdiag: float = 0.005,
                      eps: float = 1e-5) -> dict[str, torch.Tensor]:
    c = cross_correlation(z_a, z_b, eps)
    diagonal = torch.diagonal(c)
    on_diag = (1 - diagonal).pow(2).sum()
    off_diag = c.pow(2).sum() - diagonal.pow(2).sum()
    return {"loss": on_diag + lambda_offdiag * off_diag, "on_diag": on_diag.detach(), "off_diag": off_diag.detach()}
