"""SparK-style masked image modelling for a ResNet, simplified as in the study.

Patches of the view are hidden by zeroing them at the input (in normalised units, so a hidden
patch reads as mean intensity); a light UNet-style decoder reconstructs the image from every stage
of the encoder; the loss counts masked patches only, with per-patch normalised targets.
Deviation from SparK (documented on purpose): real SparK uses sparse convolutions that mask at
every layer and masked BatchNorm statistics; here convolutions are dense and see zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cxrtune.config import Config, param
from cxrtune.errors import ConfigError
from cxrtune.losses import masked_patch_mse
from cxrtune.methods.base import SSLMethod
from cxrtune.methods.registry import register_method
from cxrtune.models.backbone import Backbone


@dataclass
class SparkConfig(Config):
    """The study's SparK settings (ResNet50, 224 px: 32 px patches, a 7 x 7 grid)."""

    mask_ratio: float = param(0.6, low=0, high=1, low_open=True, high_open=True, doc="fraction of patches hidden")
    patch_size: int = param(32, low=1, doc="side of a masked patch (px); must divide the image size")
    decoder_width: int = param(256, low=8, doc="decoder channels at stride 32, halved at each upsampling")
    normalise_target: bool = param(True, doc="normalise each target patch by its mean and std")


def _conv_bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True))


class UNetDecoder(nn.Module):
    """Upsample x2 five times from stride 32 to the input size, adding a projected skip from each
    encoder stage (strides 16, 8, 4, 2) before a 3x3 conv-BN-ReLU; a 1x1 conv gives the pixels."""

    def __init__(self, stage_channels: tuple[int, ...], width: int = 256, out_chans: int = 1) -> None:
        super().__init__()
        widths = [max(8, width // 2 ** i) for i in range(6)]  # strides 32, 16, 8, 4, 2, 1
        self.top = nn.Conv2d(stage_channels[-1], widths[0], 1)
        skips = list(reversed(stage_channels[:-1]))  # strides 16, 8, 4, 2
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i], widths[i + 1], 2, stride=2) for i in range(5))
        self.laterals = nn.ModuleList(nn.Conv2d(c, widths[i + 1], 1) for i, c in enumerate(skips))
        self.fuse = nn.ModuleList(_conv_bn_relu(widths[i + 1]) for i in range(5))
        self.head = nn.Conv2d(widths[5], out_chans, 1)

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        x = self.top(stages[-1])
        skips = list(reversed(stages[:-1]))
        for i in range(5):
            x = self.ups[i](x)
            if i < len(skips):
                x = x + self.laterals[i](skips[i])
            x = self.fuse[i](x)
        return self.head(x)


def random_patch_mask(batch: int, grid: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(B, grid, grid) bool, exactly round(ratio * grid^2) True per image, drawn independently."""
    n_patches = grid * grid
    n_masked = min(n_patches - 1, max(1, round(ratio * n_patches)))
    scores = torch.rand(batch, n_patches, generator=generator, device=generator.device)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < n_masked).reshape(batch, grid, grid)


@register_method("spark", config=SparkConfig, presets={
    # SparK's own recipe: a mild crop and a flip, nothing photometric.
    "study": {"model.arch": "resnet50", "train.batch_size": 256, "train.epochs": 200, "optim.optimizer": "adamw",
              "optim.lr": 3e-4, "optim.weight_decay": 0.05, "optim.warmup_epochs": 10, "optim.clip_grad_norm": 0.0,
              "augment.crop_scale_min": 0.67, "augment.rotation_deg": 0.0, "augment.jitter_p": 0.0,
              "augment.blur_p": 0.0, "augment.noise_std": 0.0},
    "cpu": {"spark.patch_size": 8, "spark.decoder_width": 128, "optim.optimizer": "adamw", "optim.lr": 5e-4,
            "optim.weight_decay": 0.05, "optim.clip_grad_norm": 0.0, "augment.crop_scale_min": 0.67,
            "augment.rotation_deg": 0.0, "augment.jitter_p": 0.0, "augment.blur_p": 0.0, "augment.noise_std": 0.0},
    "smoke": {"spark.patch_size": 8, "spark.decoder_width": 32, "optim.optimizer": "adamw", "optim.lr": 1e-3},
})
class Spark(SSLMethod):

    @classmethod
    def check_config(cls, config) -> None:
        size, patch = config.train.image_size, config.spark.patch_size
        if size % patch or size % 32:
            raise ConfigError(
                f"train.image_size = {size} must be a multiple of 32 and of spark.patch_size = {patch} for SparK")

    def __init__(self, backbone: Backbone, config: SparkConfig) -> None:
        super().__init__(backbone)
        self.config = config
        self.decoder = UNetDecoder(backbone.stage_channels, config.decoder_width, backbone.in_chans)

    def training_loss(self, images, augment, progress):
        view = augment(images)
        size, patch = view.shape[-1], self.config.patch_size
        if size % patch or size % 32:
            raise ValueError(f"SparK needs an image size divisible by 32 and by patch_size = {patch}; got {size}")
        mask = random_patch_mask(view.shape[0], size // patch, self.config.mask_ratio, augment.generator)
        pixel_mask = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)
        visible = view.masked_fill(pixel_mask, 0.0)
        prediction = self.decoder(self.backbone.stage_features(visible))
        loss = masked_patch_mse(prediction, view, mask, patch, self.config.normalise_target)
        return {"loss": loss, "masked_fraction": mask.float().mean()}
