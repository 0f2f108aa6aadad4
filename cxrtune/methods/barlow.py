"""BarlowTwins (Zbontar et al. 2021): make the cross-correlation of two views' projections the
identity. The projector is Linear-BN-ReLU blocks and a final Linear, all without bias; the
affine-free batch normalisation before the cross-correlation lives in the loss."""

from __future__ import annotations

from dataclasses import dataclass

from cxrtune.config import Config, param
from cxrtune.losses import barlow_twins_loss
from cxrtune.methods.base import SSLMethod, embed_two_views
from cxrtune.methods.heads import mlp
from cxrtune.methods.registry import register_method
from cxrtune.models.backbone import Backbone


@dataclass
class BarlowConfig(Config):
    """The study's BarlowTwins settings (ResNet18; the reference uses 8192-wide layers, lambda 0.0051)."""

    projector_dims: tuple[int, ...] = param((2048, 2048, 2048), low=1, doc="projector layer widths")
    lambda_offdiag: float = param(0.005, low=0, doc="weight of the off-diagonal (redundancy) term")


@register_method("barlow", config=BarlowConfig, presets={
    "study": {"model.arch": "resnet18", "train.batch_size": 512, "train.epochs": 200, "train.grad_checkpointing": True,
              "optim.optimizer": "adamw", "optim.lr": 2.4e-3, "optim.weight_decay": 1e-4, "optim.warmup_epochs": 10,
              "optim.clip_grad_norm": 0.0},
    # activation checkpointing saved the study's GPU memory at batch 512; on a CPU at 64 px it only
    # recomputes the forward pass (about 30 % more compute), so the small presets leave it off
    "cpu": {"barlow.projector_dims": [512, 512, 512], "optim.optimizer": "adamw", "optim.lr": 1e-3,
            "optim.weight_decay": 1e-4, "optim.clip_grad_norm": 0.0, "train.grad_checkpointing": False},
    "smoke": {"barlow.projector_dims": [64, 64], "optim.optimizer": "adamw", "optim.lr": 1e-3,
              "train.grad_checkpointing": False},
})
class Barlow(SSLMethod):

    def __init__(self, backbone: Backbone, config: BarlowConfig) -> None:
        super().__init__(backbone)
        self.config = config
        self.projector = mlp(backbone.feature_dim, config.projector_dims, batch_norm=True, bias=False)

    def training_loss(self, images, augment, progress):
        z_a, z_b = embed_two_views(self, images, augment, self.projector)
        return barlow_twins_loss(z_a, z_b, self.config.lambda_offdiag)
