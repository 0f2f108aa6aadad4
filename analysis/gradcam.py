"""Grad-CAM on the last stage of a backbone, through a logistic head fitted the study's way.

A self-supervised backbone has no class score to differentiate, so (as the study did) a logistic
head is fitted on the pooled, L2-normalised features of **all** training positives and negatives of
one disease (the same probe objective as :mod:`cxrtune.evaluate.probe`, solved by its
:func:`~cxrtune.evaluate.logistic.solve_logistic`). :class:`HeadedBackbone` wraps backbone and head
as one ``nn.Module`` whose output is that disease's logit, and the grad-cam package's ``GradCAM``
is run on the backbone's last stage (``trunk.layer4``).

Images are preprocessed like the evaluation (intensity normalisation, resize to ``input_size``)
but uncropped (``crop_fraction = 1``), so the heatmap covers the whole cached image and lines up
with the ground-truth masks and boxes, which are stored for the whole image.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrtune.config import Config, param
from cxrtune.errors import TaskError
from cxrtune.evaluate.features import ExtractConfig, extract_features
from cxrtune.evaluate.preprocess import PreprocessConfig, preprocess
from cxrtune.evaluate.logistic import solve_logistic
from cxrtune.evaluate.probe import normalize_features
from cxrtune.models.backbone import Backbone


@dataclasses.dataclass
class GradcamConfig(Config):
    """How heatmaps are made; every default in one place."""

    input_size: int = param(224, low=32, high=4096,
                            doc="backbone input side; 224 gives ResNet's last stage a 7 x 7 map (32 px gives 1 x 1: no map)")
    C: float = param(1.0, low=0, low_open=True, doc="inverse L2 strength of the logistic head (the probe's one-shot C)")
    max_train_negatives: int = param(1000, low=1, doc="training negatives the head sees at most (a fixed, sorted sample)")
    max_images: int = param(24, low=1, doc="validation positives scored per finding at most")
    findings: tuple[str, ...] | None = param(None, doc="only these findings (default: every finding of the episodes)")
    batch_size: int = param(32, low=1, doc="images per Grad-CAM pass")
    device: str = param("cpu", doc="torch device: cpu, cuda, auto")

    def preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig(input_size=self.input_size, crop_fraction=1.0)


class HeadedBackbone(nn.Module):
    """Backbone -> global average pool -> L2 normalisation -> linear logit, one output per image."""

    def __init__(self, backbone: Backbone, weight: torch.Tensor, bias: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32).reshape(-1, 1))
        self.register_buffer("bias", torch.tensor([float(bias)], dtype=torch.float32))

    @property
    def target_layer(self) -> nn.Module:
        return self.backbone.trunk.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.feature_map(x).mean(dim=(2, 3))
        return F.normalize(pooled, dim=1) @ self.weight + self.bias


def fit_head(features: np.ndarray, labels: Sequence[int], C: float = 1.0) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression on L2-normalised ``features``: ``(weight, bias)``."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    if y.ndim != 1 or y.numel() != len(features):
        raise TaskError(f"fit_head: {len(features)} feature rows but {y.numel()} labels")
    positives = int((y == 1).sum())
    if positives == 0 or positives == y.numel():
        raise TaskError(f"fit_head: {positives} positives of {y.numel()} images; a head needs both classes")
    x = normalize_features(features, "head features")
    theta, _ = solve_logistic(x[None], y[None], torch.ones_like(y)[None], torch.tensor([float(C)], dtype=torch.float64))
    theta = theta[0].numpy()
    return theta[:-1], float(theta[-1])


def headed_backbone(backbone: Backbone, images: np.ndarray, positives: Sequence[int], negatives: Sequence[int],
                    config: GradcamConfig) -> HeadedBackbone:
    """Fit a disease's head on cache rows ``positives`` and ``negatives`` and wrap it with the backbone."""
    rows = np.asarray(list(positives) + list(negatives), dtype=np.int64)
    labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    feats = extract_features(backbone, images, rows, config.preprocessing(),
                             ExtractConfig(batch_size=config.batch_size, device=config.device), what="Grad-CAM backbone")
    weight, bias = fit_head(feats, labels, config.C)
    return HeadedBackbone(backbone, torch.from_numpy(weight), bias).eval()


def gradcam_maps(model: HeadedBackbone, images: np.ndarray, rows: Sequence[int], config: GradcamConfig) -> np.ndarray:
    """Grad-CAM heatmaps (len(rows), S, S) in [0, 1] of the positive logit, at the cache's side S."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cxrtune.device import resolve_device

    device = resolve_device(config.device)
    model = model.to(device).eval()
    side = int(images.shape[1])
    in_chans = getattr(model.backbone, "in_chans", 1)
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((rows.size, side, side), dtype=np.float32)
    with GradCAM(model=model, target_layers=[model.target_layer]) as cam:
        for start in range(0, rows.size, config.batch_size):
            pick = rows[start: start + config.batch_size]
            batch = torch.from_numpy(np.ascontiguousarray(images[pick])).to(device)
            x = preprocess(batch, config.preprocessing(), in_chans)
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * len(pick))
            maps = torch.from_numpy(np.ascontiguousarray(maps))[:, None]
            if maps.shape[-1] != side:
                maps = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
            out[start: start + len(pick)] = maps[:, 0].numpy()
    return out
