"""The study's evaluation preprocessing, on the device: centre crop, resize, normalise.

The study resized to 256 and centre-cropped 224. The image cache already holds S-px squares, so
the crop keeps the central ``crop_fraction`` (224/256) of the side and resizes it to
``input_size`` only when the two differ (at S = 256 the crop is exactly 224 px and no resampling
happens). Intensities go from uint8 to [0, 1] and are normalised with the X-ray mean and std.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from cxrtune.config import Config, param

XRAY_MEAN = 0.4776
XRAY_STD = 0.2674


@dataclasses.dataclass
class PreprocessConfig(Config):
    """How cached uint8 squares become backbone inputs (part of the feature-cache key)."""

    input_size: int = param(224, low=16, high=4096, doc="side of the backbone input in pixels")
    crop_fraction: float = param(224 / 256, low=0, high=1, low_open=True,
                                 doc="centre crop kept, as a fraction of the cached side (224/256 as the study)")
    mean: float = param(XRAY_MEAN, low=0, high=1, doc="intensity mean subtracted after scaling to [0, 1]")
    std: float = param(XRAY_STD, low=0, low_open=True, doc="intensity std divided by")


def crop_box(side: int, crop_fraction: float) -> tuple[int, int]:
    """(offset, crop side) of the centred square crop of a ``side``-px image."""
    crop = max(1, int(round(side * crop_fraction)))
    return (side - crop) // 2, crop


def preprocess(batch: torch.Tensor, config: PreprocessConfig, in_chans: int = 1) -> torch.Tensor:
    """uint8 (B, S, S) on any device -> float32 (B, in_chans, input_size, input_size), normalised."""
    if batch.ndim != 3 or batch.shape[1] != batch.shape[2]:
        raise ValueError(f"preprocess: expected a (B, S, S) batch of square images, got {tuple(batch.shape)}")
    offset, crop = crop_box(batch.shape[1], config.crop_fraction)
    x = batch[:, offset: offset + crop, offset: offset + crop].to(torch.float32).div_(255.0).unsqueeze(1)
    if crop != config.input_size:
        x = F.interpolate(x, size=(config.input_size, config.input_size), mode="bilinear",
                          align_corners=False, antialias=True)
    x = (x - config.mean) / config.std
    if in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()
