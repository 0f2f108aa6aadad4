"""MoCo v2 (Chen et al. 2020) with an optional variance term on the raw query projections.

"(...) we replace the fc head in MoCo with a 2-layer MLP head (hidden layer 2048-d, with ReLU)".
Keys come from a momentum copy of the query encoder and projector and are pushed into a queue of
negatives. The variance term (see :mod:`cxrtune.losses.infonce`) is what kept the study's MoCo
from collapsing on homogeneous radiographs; ``variance_weight = 0`` is plain MoCo v2. No
shuffle-BN (single device, as in the study).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxrtune.config import Config, param
from cxrtune.losses import MocoLoss
from cxrtune.methods.base import MomentumTargetMethod, Progress
from cxrtune.methods.heads import mlp
from cxrtune.methods.registry import register_method
from cxrtune.models.backbone import Backbone


@dataclass
class MocoConfig(Config):
    """The study's MoCo v2 + variance settings (ResNet50, 224 px)."""

    projector_hidden: int = param(2048, low=1, doc="hidden width of the 2-layer MLP projector")
    projector_out: int = param(128, low=1, doc="projection dimension")
    queue_size: int = param(65536, low=1, doc="number of negative keys kept")
    momentum: float = param(0.999, low=0, high=1, doc="key encoder EMA momentum")
    temperature: float = param(0.07, low=0, low_open=True, doc="InfoNCE temperature")
    variance_weight: float = param(1.0, low=0, doc="weight of the variance hinge (0 = plain MoCo)")
    variance_target: float = param(1.0, low=0, low_open=True, doc="std the hinge asks of each raw projection dim")
    symmetric: bool = param(False, doc="also use the second view as query (two losses per step)")


@register_method("moco", config=MocoConfig, presets={
    "study": {"model.arch": "resnet50", "train.batch_size": 384, "train.epochs": 800, "optim.optimizer": "sgd",
              "optim.lr": 0.045, "optim.weight_decay": 1e-4, "optim.warmup_epochs": 10, "optim.clip_grad_norm": 3.0},
    # No flip, and crops that keep the body's size and proportions (80-100 % of the image, aspect
    # 0.9-1.11): body size and lung height carry findings (the phantom's clinical correlates), and a
    # flip alone halves the share of augmented views whose nearest neighbour is their own source.
    # Measured with bench/ssl_vs_random.py on phantom version 6 (docs/performance.md).
    "cpu": {"moco.projector_hidden": 512, "moco.queue_size": 4096, "moco.momentum": 0.99, "moco.temperature": 0.2,
            "optim.optimizer": "sgd", "optim.lr": 0.06, "optim.weight_decay": 5e-4, "optim.clip_grad_norm": 3.0,
            "augment.hflip_p": 0.0, "augment.crop_scale_min": 0.8, "augment.crop_ratio_min": 0.9,
            "augment.crop_ratio_max": 1.111},
    "smoke": {"moco.projector_hidden": 64, "moco.projector_out": 32, "moco.queue_size": 64, "moco.momentum": 0.99,
              "optim.lr": 0.03},
})
class Moco(MomentumTargetMethod):
    targets = (("key_backbone", "backbone"), ("key_projector", "projector"))

    def __init__(self, backbone: Backbone, config: MocoConfig) -> None:
        super().__init__(backbone)
        self.config = config
        self.projector = mlp(backbone.feature_dim, (config.projector_hidden, config.projector_out), batch_norm=False)
        self.make_targets()
        self.criterion = MocoLoss(config.temperature, config.variance_weight, config.variance_target)
        queue = F.normalize(torch.randn(config.queue_size, config.projector_out), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _keys(self, view: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.key_projector(self.key_backbone(view)).float(), dim=1)

    def training_loss(self, images, augment, progress):
        view_a, view_b = augment(images), augment(images)
        queue = self.queue.clone()  # the loss must see the queue from before this step's keys
        keys_b = self._keys(view_b)
        out = self.criterion(self.projector(self.backbone(view_a)), keys_b, queue)
        enqueue = keys_b
        if self.config.symmetric:
            keys_a = self._keys(view_a)
            other = self.criterion(self.projector(self.backbone(view_b)), keys_a, queue)
            out = {k: (out[k] + other[k]) / 2 for k in out}
            enqueue = torch.cat([keys_b, keys_a])
        self._enqueue(enqueue)
        return out

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        n = keys.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.queue.shape[0]
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue.shape[0])

    def momentum_at(self, progress: Progress) -> float:
        return self.config.momentum
