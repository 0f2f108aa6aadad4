"""BYOL (Grill et al., NeurIPS 2020): an online network predicts a slowly moving target network's
projection of another view of the same image; no negatives.

Online: backbone + projector + predictor; target: an EMA copy of backbone + projector, no
predictor, no gradient. "This MLP consists in a linear layer with output size 4096 followed by
batch normalization, rectified linear units (ReLU), and a final linear layer with output dimension
256 ... The predictor q uses the same architecture as g" (appendix A). The target follows the
online weights after every optimiser step with "tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
with k the current training step and K the maximum number of training steps", tau_base = 0.996 for
the 1000-epoch recipe (:func:`~cxrtune.methods.base.cosine_increase` from tau_base to 1 is exactly
this; k = the step just taken, 0-based, as the official ``target_ema(global_step, ...)``). Only
parameters are averaged: the target's BatchNorm statistics are its own (its forward passes run in
training mode, so they never enter the loss). The target starts as a copy of the online network
(the official code initialises it independently, noting no significant difference from starting
both the same). The loss: :mod:`cxrtune.losses.byol` (the two directions summed, as the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cxrtune.config import Config, param
from cxrtune.losses.byol import byol_loss
from cxrtune.methods.base import MomentumTargetMethod, Progress, cosine_increase
from cxrtune.methods.heads import mlp
from cxrtune.methods.registry import register_method
from cxrtune.models.backbone import Backbone


@dataclass
class ByolConfig(Config):
    """BYOL's published settings (ResNet50, 224 px, 1000 epochs)."""

    projector_hidden: int = param(4096, low=1, doc="hidden width of the projector (Linear-BN-ReLU-Linear)")
    projector_out: int = param(256, low=1, doc="projection dimension (the predictor's input and output)")
    predictor_hidden: int = param(4096, low=1, doc="hidden width of the predictor (online network only)")
    tau_base: float = param(0.996, low=0, high=1,
                            doc="target EMA momentum at step 0; a cosine takes it to 1 at the last step")


@register_method("byol", config=ByolConfig, presets={
    # The paper's recipe: "LARS ... over 1000 epochs, with a warm-up period of 10 epochs. We set the
    # base learning rate to 0.2, scaled linearly with the batch size (LearningRate = 0.2 x
    # BatchSize/256) ... a global weight decay parameter of 1.5e-6 while excluding the biases and
    # batch normalization parameters from both LARS adaptation and weight decay", cosine to 0, at
    # batch 4096 on 512 TPU cores. On one GPU: batch 256 (two online views of a ResNet50 at 224 px
    # with gradients, with activation checkpointing; its memory not measured here), so
    # lr = 0.2 * 256 / 256 = 0.2 by the paper's rule; "the performance of BYOL remains stable over
    # a wide range of batch sizes from 256 to 4096, and only drops for smaller values due to batch
    # normalization layers in the encoder". The official code's shorter recipes use tau_base 0.99
    # (100 and 300 epochs) and 0.97 (40).
    "study": {"model.arch": "resnet50", "train.batch_size": 256, "train.epochs": 1000, "train.grad_checkpointing": True,
              "optim.optimizer": "lars", "optim.lr": 0.2, "optim.weight_decay": 1.5e-6, "optim.momentum": 0.9,
              "optim.lars_eta": 0.001, "optim.warmup_epochs": 10, "optim.min_lr_ratio": 0.0,
              "optim.exclude_norm_bias_decay": True, "optim.clip_grad_norm": 0.0},
    # 64 px on 2 cores, as MoCo's cpu preset (its nearest relative: an EMA copy of encoder and
    # projector, two views): SGD 0.06, weight decay 5e-4 (biases and norms exempt, as in the paper),
    # clipping at 3, and MoCo's crops (80-100 %, near-square, no flip), which MoCo measured on the
    # phantom (docs/performance.md) and which keep the body size and lung height that carry
    # findings. About 3,100 steps (20 epochs of 10,000 images at batch 64) are far fewer than the
    # paper's 1000-epoch run, so tau_base is 0.99, the official value for its 100- and 300-epoch
    # runs (a target that lags ~100 steps, not ~250), as MoCo's cpu momentum. Heads 1024 wide:
    # twice ResNet18's 512 features, as the paper's 4096 is twice ResNet50's 2048. No activation
    # checkpointing (~30 % more compute for nothing on a CPU). Not measured for BYOL.
    "cpu": {"byol.projector_hidden": 1024, "byol.predictor_hidden": 1024, "byol.tau_base": 0.99,
            "train.grad_checkpointing": False, "optim.optimizer": "sgd", "optim.lr": 0.06, "optim.weight_decay": 5e-4,
            "optim.clip_grad_norm": 3.0, "augment.hflip_p": 0.0, "augment.crop_scale_min": 0.8,
            "augment.crop_ratio_min": 0.9, "augment.crop_ratio_max": 1.111},
    "smoke": {"byol.projector_hidden": 64, "byol.projector_out": 32, "byol.predictor_hidden": 64, "byol.tau_base": 0.99,
              "train.grad_checkpointing": False, "optim.optimizer": "sgd", "optim.lr": 0.03},
})
class Byol(MomentumTargetMethod):
    targets = (("target_backbone", "backbone"), ("target_projector", "projector"))

    def __init__(self, backbone: Backbone, config: ByolConfig) -> None:
        super().__init__(backbone)
        self.config = config
        self.projector = mlp(backbone.feature_dim, (config.projector_hidden, config.projector_out), batch_norm=True)
        self.predictor = mlp(config.projector_out, (config.predictor_hidden, config.projector_out), batch_norm=True)
        self.make_targets()

    def _online(self, view: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(view)))

    def _target(self, view: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.target_projector(self.target_backbone(view))

    def training_loss(self, images, augment, progress):
        view_a, view_b = augment(images), augment(images)
        # one view per forward pass, so each pass's BatchNorms see one view's statistics (as the
        # official code, which applies the networks to view1 and view2 separately)
        prediction_a, prediction_b = self._online(view_a), self._online(view_b)
        target_a, target_b = self._target(view_a), self._target(view_b)
        out = byol_loss(prediction_a, target_b, prediction_b, target_a)
        out["target_momentum"] = torch.tensor(self.momentum_at(progress))
        return out

    def momentum_at(self, progress: Progress) -> float:
        return cosine_increase(self.config.tau_base, 1.0, progress.fraction)

