"""BYOL's regression loss (Grill et al., NeurIPS 2020): the normalised MSE between the online
network's prediction of one view and the target network's projection of the other.

"L = ||qbar - zbar'||^2 = 2 - 2 <q, z'> / (||q|| ||z'||)" for one direction, and "We symmetrize the
loss L by separately feeding v' to the online network and v to the target network to compute L~
... L^BYOL = L + L~": the two directions are *summed* (the paper), and each is averaged over the
batch, as the official code does (deepmind-research/byol, ``byol_experiment.py``:
``repr_loss = regression_loss(pred_view1, target_proj_view2) + regression_loss(pred_view2,
target_proj_view1); repr_loss = jnp.mean(repr_loss)``; the quotes' notation simplified). So the
loss lies in [0, 8], 0 when every prediction points along its target.

The targets carry no gradient (the method computes them under ``no_grad``; they are detached here
too). Computed in float32 (float64 input stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _precise(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``2 - 2 cos(prediction_i, target_i)`` = ``||p_i/|p_i| - t_i/|t_i|||^2``, shape (batch,)."""
    if prediction.ndim != 2 or prediction.shape != target.shape or prediction.shape[0] < 1:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must both be "
                         "(batch, dim)")
    p = F.normalize(_precise(prediction), dim=1)
    t = F.normalize(_precise(target.detach()), dim=1)
    return 2 - 2 * (p * t).sum(dim=1)


def byol_loss(prediction_a: torch.Tensor, target_b: torch.Tensor, prediction_b: torch.Tensor,
              target_a: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetrised BYOL loss: the online prediction of view a against the target projection of
    view b, plus the prediction of b against the target of a, each a batch mean."""
    a_to_b = regression_loss(prediction_a, target_b).mean()
    b_to_a = regression_loss(prediction_b, target_a).mean()
    return {"loss": a_to_b + b_to_a, "loss_ab": a_to_b.detach(), "loss_ba": b_to_a.detach()}
