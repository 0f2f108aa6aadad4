"""Self-supervised losses, one per file, each a pure function plus a thin ``nn.Module``.

The losses know nothing of encoders or augmentation: they take projections (or predictions and
targets) and return a scalar, so each can be checked against a plain computation.
"""

from cxrtune.losses.barlow import barlow_twins_loss, cross_correlation
from cxrtune.losses.dino import DinoLoss, dino_loss, updated_center
from cxrtune.losses.infonce import MocoLoss, info_nce, variance_hinge
from cxrtune.losses.masked_mse import masked_patch_mse, patchify

__all__ = [
    "MocoLoss", "info_nce", "variance_hinge",
    "barlow_twins_loss", "cross_correlation",
    "masked_patch_mse", "patchify",
    "DinoLoss", "dino_loss", "updated_center",
]
