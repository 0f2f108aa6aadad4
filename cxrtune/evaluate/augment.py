"""Seeded, per-image augmentation of uint8 batches for finetuning (the pretraining recipe).

Random resized crop (scale 0.08-1, ratio 3/4-4/3), horizontal flip, rotation +-10 degrees (one
affine resampling for all three), brightness/contrast jitter 0.8 with p 0.8, Gaussian blur
(kernel 9, sigma 0.1-2) with p 0.5, then X-ray normalisation and Gaussian noise (std 0.1).
Every random number comes from the ``torch.Generator`` passed in, drawn on the CPU, so a seed
fixes the whole stream: the study's finetune baseline moved by .02 between runs because its
augmentation was not seeded.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from cxrtune.config import Config, param
from cxrtune.evaluate.preprocess import PreprocessConfig


@dataclasses.dataclass
class AugmentConfig(Config):
    crop_scale_min: float = param(0.08, low=0, high=1, low_open=True, doc="smallest crop area fraction")
    flip_p: float = param(0.5, low=0, high=1, doc="probability of a horizontal flip")
    rotation_deg: float = param(10.0, low=0, high=180, doc="rotation drawn from +-this many degrees")
    jitter: float = param(0.8, low=0, high=1, doc="brightness and contrast factors drawn from 1 +- jitter")
    jitter_p: float = param(0.8, low=0, high=1, doc="probability of brightness/contrast jitter")
    blur_p: float = param(0.5, low=0, high=1, doc="probability of a Gaussian blur")
    blur_kernel: int = param(9, low=1, doc="blur kernel size (odd)")
    noise_std: float = param(0.1, low=0, doc="Gaussian noise std added after normalisation")


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def augment(batch: torch.Tensor, preprocessing: PreprocessConfig, config: AugmentConfig,
            generator: torch.Generator, in_chans: int = 1) -> torch.Tensor:
    """uint8 (B, S, S) -> augmented, normalised float32 (B, in_chans, size, size) on ``batch``'s device."""
    B, device, size = batch.shape[0], batch.device, preprocessing.input_size
    x = batch.to(torch.float32).div(255.0).unsqueeze(1)
    # -- crop + flip + rotation as one affine map from output to input coordinates ---------------
    area = _uniform(B, config.crop_scale_min, 1.0, generator)
    log_ratio = _uniform(B, math.log(3 / 4), math.log(4 / 3), generator)
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    shift_x = _uniform(B, -1, 1, generator) * (1 - width)
    shift_y = _uniform(B, -1, 1, generator) * (1 - height)
    flip = torch.where(torch.rand(B, generator=generator) < config.flip_p, -1.0, 1.0).to(torch.float64)
    angle = _uniform(B, -config.rotation_deg, config.rotation_deg, generator) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(B, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos * width * flip, -sin * height
    theta[:, 1, 0], theta[:, 1, 1] = sin * width * flip, cos * height
    theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
    grid = F.affine_grid(theta.to(device, torch.float32), [B, 1, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # -- brightness / contrast ------------------------------------------------------------------
    jitter_on = (torch.rand(B, generator=generator) < config.jitter_p).to(torch.float64)
    brightness = 1 + jitter_on * _uniform(B, -config.jitter, config.jitter, generator)
    contrast = 1 + jitter_on * _uniform(B, -config.jitter, config.jitter, generator)
    brightness = brightness.clamp(min=0).to(device, torch.float32).view(B, 1, 1, 1)
    contrast = contrast.clamp(min=0).to(device, torch.float32).view(B, 1, 1, 1)
    x = (x * brightness).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    # -- blur: per-image Gaussian kernels as a grouped, separable convolution ------------------------
    blur_on = torch.rand(B, generator=generator) < config.blur_p
    sigma = _uniform(B, 0.1, 2.0, generator)
    k = config.blur_kernel | 1
    offsets = torch.arange(k, dtype=torch.float64) - k // 2
    kernels = torch.exp(-offsets[None, :] ** 2 / (2 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)
    identity = torch.zeros(k, dtype=torch.float64)
    identity[k // 2] = 1
    kernels = torch.where(blur_on[:, None], kernels, identity[None, :]).to(device, torch.float32)
    x = x.transpose(0, 1)  # (1, B, H, W): one group per image
    x = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="reflect"), kernels.view(B, 1, 1, k), groups=B)
    x = F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="reflect"), kernels.view(B, 1, k, 1), groups=B)
    x = x.transpose(0, 1)
    # -- normalise, then noise -------------------------------------------------------------------
    x = (x - preprocessing.mean) / preprocessing.std
    if config.noise_std > 0:
        x = x + config.noise_std * torch.randn(x.shape, generator=generator).to(device)
    if in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()
