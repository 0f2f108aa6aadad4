"""VICReg (Bardes, Ponce, LeCun, ICLR 2022): invariance, variance and covariance terms on the
embeddings of two views.

"two regularizations terms applied to both embeddings separately: (1) a term that maintains the
variance of each embedding dimension above a threshold, (2) a term that decorrelates each pair of
variables" (the abstract), plus an invariance term that pulls the two views' embeddings together.
Each term is the official repository's (facebookresearch/vicreg, ``main_vicreg.py``,
``VICReg.forward``, quoted below), checked against the paper's definitions; where the paper's
equations and the code differ, this module follows the code, with which the published weights
were tuned:

- invariance ``s(Z, Z') = mean over samples and dimensions of (z - z')^2``: the code's
  ``repr_loss = F.mse_loss(x, y)``. The paper writes ``s(Z, Z') = 1/n sum_i ||z_i - z'_i||^2``
  (a sum over the d dimensions, d times larger);
- variance ``v(Z) = 1/d sum_j relu(gamma - sqrt(Var(z^j) + eps))`` with the unbiased batch
  variance, gamma = 1 and eps = 1e-4 (the code: ``std_x = torch.sqrt(x.var(dim=0) + 0.0001)``;
  ``torch.mean(F.relu(1 - std_x))``). The code *averages* the two branches
  (``std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2``) where
  the paper's total loss sums them (``lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')]``);
- covariance ``c(Z) = 1/d sum_{i != j} C(Z)_ij^2`` with ``C(Z) = 1/(n-1) sum_i (z_i - zbar)(z_i - zbar)^T``,
  *summed* over the two branches (the code: ``cov_x = (x.T @ x) / (batch_size - 1)``;
  ``off_diagonal(cov_x).pow_(2).sum().div(num_features) + off_diagonal(cov_y)...``).

``loss = invariance_weight * s + variance_weight * v + covariance_weight * c`` with the
repository's defaults ``--sim-coeff 25 --std-coeff 25 --cov-coeff 1``. The three terms come back
detached beside ``loss`` (``variance`` already averaged, ``covariance`` already summed over the
branches), so ``loss`` is exactly their weighted sum.

Computed in float32 (float64 input stays float64) with autocast off, so that on a GPU the
(d, d) covariance matmul does not run in bf16 (8 significant bits) as the rest of the step does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    if z_a.ndim != 2 or z_a.shape != z_b.shape or z_a.shape[0] < 2 or z_a.shape[1] < 1:
        raise ValueError(f"z_a {tuple(z_a.shape)} and z_b {tuple(z_b.shape)} must both be (batch >= 2, dim >= 1)")


def _check_one(z: torch.Tensor) -> None:
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(f"z {tuple(z.shape)} must be (batch >= 2, dim >= 1)")


def _precise(z: torch.Tensor) -> torch.Tensor:
    return z if z.dtype == torch.float64 else z.float()


def invariance_term(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """``mean((z_a - z_b)^2)`` over samples and dimensions (the official ``F.mse_loss``)."""
    _check_pair(z_a, z_b)
    return F.mse_loss(_precise(z_a), _precise(z_b))


def variance_term(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``mean_d relu(gamma - sqrt(var(z[:, d]) + eps))`` with the unbiased batch variance (one branch)."""
    _check_one(z)
    std = torch.sqrt(_precise(z).var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def covariance_matrix(z: torch.Tensor) -> torch.Tensor:
    """The (d, d) covariance of a batch: centred, divided by n - 1."""
    _check_one(z)
    z = _precise(z)
    centred = z - z.mean(dim=0)
    return centred.t() @ centred / (z.shape[0] - 1)


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """Sum of the squared off-diagonal covariances divided by the dimension (one branch)."""
    c = covariance_matrix(z)
    d = c.shape[0]
    off_diagonal = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:]  # every entry but the diagonal
    return off_diagonal.pow(2).sum() / d


def vicreg_loss(z_a: torch.Tensor, z_b: torch.Tensor, invariance_weight: float = 25.0, variance_weight: float = 25.0,
                covariance_weight: float = 1.0, gamma: float = 1.0, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """VICReg on two views' embeddings ``z_a``, ``z_b`` (batch, dim); see the module docstring."""
    _check_pair(z_a, z_b)
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        invariance = invariance_term(z_a, z_b)
        variance = (variance_term(z_a, gamma, eps) + variance_term(z_b, gamma, eps)) / 2
        covariance = covariance_term(z_a) + covariance_term(z_b)
        loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return {"loss": loss, "invariance": invariance.detach(), "variance": variance.detach(),
            "covariance": covariance.detach()}
