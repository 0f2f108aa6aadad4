"""BarlowTwins (Zbontar et al. 2021): make the cross-correlation of two views' projections the
identity. The projector is Linear-BN-ReLU blocks and a final Linear, all without bias; the
affine-free batch normalisation before the cross-correlation lives in the loss."""

from __future__ import annotations

from dataclasses import dataclass

from cxrtune.config import Config, param
from cxrtune.losses import barlow_twins_loss
from cxrtune.methods.base import SSLMethod
from cxrtune.methods.heads import mlp
from cxrtune.models.backbone import Backbone


@dataclass
class BarlowConfig(Config):
    """The study's BarlowTwins settings (ResNet18; the reference uses 8192-wide layers, lambda 0.0051)."""

    projector_dims: tuple[int, ...] = param((2048, 2048, 2048), low=1, doc="projector layer widths")
    lambda_offdiag: float = param(0.005, low=0, doc="weight of the off-diagonal (redundancy) term")


class Barlow(SSLMethod):
    name = "barlow"

    def __init__(self, backbone: Backbone, config: BarlowConfig) -> None:
        super().__init__(backbone)
        self.config = config
        self.projector = mlp(backbone.feature_dim, config.projector_dims, batch_norm=True, bias=False)

    def training_loss(self, images, augment, progress):
        view_a, view_b = augment(images), augment(images)
        z_a = self.projector(self.backbone(view_a))
        z_b = self.projector(self.backbone(view_b))
        return barlow_twins_loss(z_a, z_b, self.config.lambda_offdiag)
