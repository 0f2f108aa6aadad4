"""DINO (Caron et al. 2021) for a ResNet: self-distillation from an EMA teacher.

The teacher sees the global crops only; the student sees global and local crops. Teacher outputs
are centred (EMA of their batch mean) and sharpened by a low temperature.

Defaults: the reference DINO values (teacher temperature 0.04, centre momentum 0.9), not the
study's run, whose loss stayed flat at 5.42 (about log 256, a uniform output) from epoch 0 with
teacher temperature 0.07 -> 0.04 and centre momentum 0.99. That run is
``dino.warmup_teacher_temperature=0.07 dino.warmup_teacher_epochs=30 dino.center_momentum=0.99``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cxrtune.config import Config, param
from cxrtune.errors import ConfigError
from cxrtune.losses import DinoLoss
from cxrtune.methods.base import MomentumTargetMethod, Progress, cosine_increase
from cxrtune.methods.heads import DinoHead
from cxrtune.methods.registry import register_method
from cxrtune.models.backbone import Backbone


@dataclass
class DinoConfig(Config):
    out_dim: int = param(256, low=2, doc="prototypes (the study used 256; the reference 65536)")
    hidden_dim: int = param(2048, low=1, doc="head MLP hidden width")
    bottleneck_dim: int = param(256, low=1, doc="head bottleneck before the normalised last layer")
    student_temperature: float = param(0.1, low=0, low_open=True)
    teacher_temperature: float = param(0.04, low=0, low_open=True, doc="teacher temperature after warmup")
    warmup_teacher_temperature: float = param(0.04, low=0, low_open=True, doc="teacher temperature at epoch 0")
    warmup_teacher_epochs: int = param(0, low=0, doc="epochs of linear teacher temperature warmup")
    center_momentum: float = param(0.9, low=0, high=1)
    teacher_momentum: float = param(0.99, low=0, high=1, doc="teacher EMA momentum at the start (study 0.99)")
    teacher_momentum_final: float = param(1.0, low=0, high=1, doc="reached by a cosine at the last step")
    local_crops: int = param(0, low=0, doc="number of local crops (study: none)")
    local_crop_size: int = param(96, low=16, doc="side of a local crop (px)")
    local_scale_min: float = param(0.05, low=0, high=1, low_open=True)
    local_scale_max: float = param(0.4, low=0, high=1, low_open=True)
    freeze_last_layer_epochs: int = param(1, low=0, doc="keep the head's last layer fixed this many epochs")

    def validate(self) -> None:
        if self.local_scale_min > self.local_scale_max:
            raise ConfigError(f"DinoConfig.local_scale_min = {self.local_scale_min} exceeds local_scale_max = {self.local_scale_max}")


@register_method("dino", config=DinoConfig, presets={
    # The study's photometric recipe for DINO was not recorded separately: MoCo's is used.
    "study": {"model.arch": "resnet50", "train.batch_size": 64, "train.epochs": 100, "optim.optimizer": "adamw",
              "optim.lr": 5e-4, "optim.weight_decay": 0.04, "optim.warmup_epochs": 10, "optim.clip_grad_norm": 3.0,
              "augment.crop_scale_min": 0.4},
    "cpu": {"dino.hidden_dim": 512, "dino.bottleneck_dim": 128, "dino.local_crop_size": 32,
            "optim.optimizer": "adamw", "optim.lr": 5e-4, "optim.weight_decay": 0.04, "optim.clip_grad_norm": 3.0,
            "augment.crop_scale_min": 0.4},
    "smoke": {"dino.out_dim": 64, "dino.hidden_dim": 64, "dino.bottleneck_dim": 32, "dino.local_crops": 2,
              "dino.local_crop_size": 16, "optim.optimizer": "adamw", "optim.lr": 1e-3},
})
class Dino(MomentumTargetMethod):
    targets = (("teacher_backbone", "backbone"), ("teacher_head", "head"))

    @classmethod
    def check_config(cls, config) -> None:
        dino, size = config.dino, config.train.image_size
        if dino.local_crops and dino.local_crop_size > size:
            raise ConfigError(f"dino.local_crop_size = {dino.local_crop_size} exceeds train.image_size = {size}")

    def __init__(self, backbone: Backbone, config: DinoConfig) -> None:
        super().__init__(backbone)
        self.config = config
        self.head = DinoHead(backbone.feature_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim)
        self.make_targets()
        self.criterion = DinoLoss(config.out_dim, config.student_temperature, config.center_momentum)

    def teacher_temperature(self, epoch: int) -> float:
        c = self.config
        if epoch >= c.warmup_teacher_epochs:
            return c.teacher_temperature
        step = (c.teacher_temperature - c.warmup_teacher_temperature) / c.warmup_teacher_epochs
        return c.warmup_teacher_temperature + step * epoch

    def training_loss(self, images, augment, progress):
        c = self.config
        global_views = [augment(images), augment(images)]
        local_views = [augment(images, out_size=c.local_crop_size, scale=(c.local_scale_min, c.local_scale_max))
                       for _ in range(c.local_crops)]
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(global_views))).chunk(2)
        student = list(self.head(self.backbone(torch.cat(global_views))).chunk(2))
        if local_views:
            student += list(self.head(self.backbone(torch.cat(local_views))).chunk(len(local_views)))
        temperature = self.teacher_temperature(progress.epoch)
        out = self.criterion(student, teacher, temperature)
        out["teacher_temperature"] = torch.tensor(temperature)
        return out

    def before_optimizer_step(self, progress: Progress) -> None:
        if progress.epoch < self.config.freeze_last_layer_epochs:
            self.head.last_layer.grad = None

    def momentum_at(self, progress: Progress) -> float:
        return cosine_increase(self.config.teacher_momentum, self.config.teacher_momentum_final, progress.fraction)

