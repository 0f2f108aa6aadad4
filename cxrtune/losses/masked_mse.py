"""SparK / MAE reconstruction loss: MSE on masked patches only, per-patch normalised targets.

MAE (He et al. 2022): "the loss only on masked patches ... using normalized pixels as the
reconstruction target ... the mean and standard deviation of all pixels in a patch".
Visible patches do not count: reconstructing what the encoder saw teaches nothing.
"""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch*patch*C), patches in row-major order of the (H/p, W/p) grid."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def masked_patch_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int,
                     normalise_target: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    ``mask`` (B, H/p, W/p) is True where a patch was hidden from the encoder. Targets are
    normalised per patch by their mean and unbiased variance (as MAE's reference code does).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    pred = patchify(prediction.float(), patch)
    tgt = patchify(target.float(), patch)
    if mask.shape[0] != pred.shape[0] or mask[0].numel() != pred.shape[1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the {pred.shape[1]}-patch grid")
    if normalise_target:
        mean = tgt.mean(dim=-1, keepdim=True)
        var = tgt.var(dim=-1, keepdim=True)
        tgt = (tgt - mean) / torch.sqrt(var + eps)
    per_patch = (pred - tgt).pow(2).mean(dim=-1)
    weights = mask.reshape(mask.shape[0], -1).to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)
