"""VICReg (Bardes, Ponce, LeCun, ICLR 2022): two views through one encoder and expander, pulled
together by an invariance term and kept from collapsing by a variance and a covariance term.

"VICReg does not require techniques such as: weight sharing between the branches, batch
normalization, feature-wise normalization, output quantization, stop gradient, memory banks"
(the abstract): no momentum copy, no queue, no predictor; both branches get gradients. The expander
is the official one (facebookresearch/vicreg ``Projector``, ``--mlp 8192-8192-8192``): Linear-BN-ReLU
twice, then a Linear without bias; the hidden Linears' biases are dropped too, as a BatchNorm right
after a Linear cancels its bias. The loss and its terms: :mod:`cxrtune.losses.vicreg`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrtune.config import Config, param
from cxrtune.errors import ConfigError
from cxrtune.losses.vicreg import vicreg_loss
from cxrtune.methods.base import SSLMethod, embed_two_views
from cxrtune.methods.heads import mlp
from cxrtune.methods.registry import register_method
from cxrtune.models.backbone import Backbone


@dataclass
class VicregConfig(Config):
    """VICReg's published settings (ResNet50, 224 px): an 8192 x 3 expander, weights 25/25/1."""

    expander_dims: tuple[int, ...] = param((8192, 8192, 8192), low=1,
                                           doc="expander layer widths (the last is the embedding)")
    invariance_weight: float = param(25.0, low=0, doc="lambda: weight of the MSE between the two views' embeddings")
    variance_weight: float = param(25.0, low=0, doc="mu: weight of the std hinge (mean of the two branches)")
    covariance_weight: float = param(1.0, low=0,
                                     doc="nu: weight of the off-diagonal covariance (sum of the two branches)")

    def validate(self) -> None:
        if not self.expander_dims:
            raise ConfigError("VicregConfig.expander_dims is empty: give at least the embedding width, "
                              "e.g. [8192, 8192, 8192]")


@register_method("vicreg", config=VicregConfig, presets={
    # The official recipe (LARS, base lr 0.2, "effective learning after warmup is [base-lr] *
    # [batch-size] / 256", weight decay 1e-6, 10 warmup epochs, cosine to base_lr * 0.001, biases
    # and norms excluded from LARS adaptation and weight decay, no clipping) at the repository's
    # batch 2048, for the paper's 1000 epochs. On one GPU: batch 256 (two views of a ResNet50 at
    # 224 px with gradients, 512 images a step, with activation checkpointing as BarlowTwins needed
    # at 512; its memory not measured here), so the lr follows the repository's linear rule:
    # 0.2 * 256 / 256 = 0.2.
    "study": {"model.arch": "resnet50", "train.batch_size": 256, "train.epochs": 1000, "train.grad_checkpointing": True,
              "optim.optimizer": "lars", "optim.lr": 0.2, "optim.weight_decay": 1e-6, "optim.momentum": 0.9,
              "optim.lars_eta": 0.001, "optim.warmup_epochs": 10, "optim.min_lr_ratio": 0.001,
              "optim.exclude_norm_bias_decay": True, "optim.clip_grad_norm": 0.0},
    # 64 px on 2 cores, as BarlowTwins' cpu preset (its nearest relative: two views, a BN expander,
    # a loss on batch statistics): AdamW 1e-3, weight decay 1e-4, no clipping. AdamW's step does not
    # grow with the loss's scale, so a sweep that raises the weights does not also raise the
    # effective lr. A 3 x 1024 expander and its covariance cost 2.6 % of the ResNet18 trunk's
    # forward FLOPs at 64 px (torch's FlopCounterMode, batch 64): wider than BarlowTwins' 512 for
    # little. No activation checkpointing (~30 % more compute for nothing on a CPU). The crops are
    # MoCo's cpu crops (80-100 %, near-square, no flip), measured for MoCo on the phantom
    # (docs/performance.md): they keep the body size and lung height that carry findings, which an
    # invariance method would otherwise learn to ignore. Not measured for VICReg.
    "cpu": {"vicreg.expander_dims": [1024, 1024, 1024], "train.grad_checkpointing": False,
            "optim.optimizer": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 1e-4, "optim.clip_grad_norm": 0.0,
            "augment.hflip_p": 0.0, "augment.crop_scale_min": 0.8, "augment.crop_ratio_min": 0.9,
            "augment.crop_ratio_max": 1.111},
    "smoke": {"vicreg.expander_dims": [64, 64], "train.grad_checkpointing": False, "optim.optimizer": "adamw",
              "optim.lr": 1e-3},
})
class Vicreg(SSLMethod):

    def __init__(self, backbone: Backbone, config: VicregConfig) -> None:
        super().__init__(backbone)
        self.config = config
        self.expander = mlp(backbone.feature_dim, config.expander_dims, batch_norm=True, bias=False)

    def training_loss(self, images, augment, progress):
        c = self.config
        z_a, z_b = embed_two_views(self, images, augment, self.expander)
        return vicreg_loss(z_a, z_b, c.invariance_weight, c.variance_weight, c.covariance_weight)
