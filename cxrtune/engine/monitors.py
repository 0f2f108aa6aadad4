"""Collapse monitors on a fixed image set: is the backbone still telling images apart?

- ``feature_std``: mean over dimensions of the per-dimension std of the (raw, pooled) backbone
  features. The study's plain MoCo fell from 0.363 to 0.060 while its loss looked fine.
- ``effective_rank``: exp(entropy of the normalised singular values of the centred features)
  (Roy & Vetterli 2007): 1 when every image maps to one line, up to min(n, d).
- ``mean_cosine``: mean cosine similarity over fixed random pairs of distinct images; near 1 when
  every image maps to the same direction.

These three use the backbone in evaluation mode (BatchNorm running statistics), as a probe sees
it. Early in a run, or when weights move fast, running statistics lag the weights and can make
eval-mode features look collapsed when they are not (or hide a collapse). ``feature_std_batch``
is the same std with BatchNorm using the statistics of the monitor set itself (one batch, running
statistics left untouched): the features the loss sees, free of that lag.
"""

from __future__ import annotations

import numpy as np
import torch

from cxrtune.augment import preprocess


def feature_std(features: torch.Tensor) -> float:
    return float(features.double().std(dim=0).mean())


def effective_rank(features: torch.Tensor) -> float:
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    if not torch.isfinite(centred).all():
        return float("nan")  # diverged weights: the loop reports the divergence
    s = torch.linalg.svdvals(centred)
    total = s.sum()
    if total <= 0:
        return 1.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def random_pairs(n: int, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` pairs (i, j) with i != j, drawn once from a fixed seed."""
    if n < 2:
        raise ValueError(f"need at least 2 images for pairs, got {n}")
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (count,), generator=g)
    j = (i + torch.randint(1, n, (count,), generator=g)) % n
    return i, j


def mean_cosine(features: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
    f = torch.nn.functional.normalize(features.double(), dim=1)
    i, j = pairs
    return float((f[i] * f[j]).sum(dim=1).mean())


def collapse_metrics(features: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    return {"feature_std": feature_std(features), "effective_rank": effective_rank(features),
            "mean_cosine": mean_cosine(features, pairs)}


class CollapseMonitor:
    """Holds the fixed images (uint8, on the device) and measures a backbone on them."""

    def __init__(self, images: np.ndarray, image_size: int, device: torch.device, pairs: int = 2048,
                 batch_size: int = 128, seed: int = 0) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.image_size = image_size
        self.batch_size = batch_size
        self.pairs = random_pairs(len(images), pairs, seed)

    @torch.no_grad()
    def features(self, backbone: torch.nn.Module) -> torch.Tensor:
        was_training = backbone.training
        backbone.eval()
        try:
            out = [backbone(preprocess(self.images[i:i + self.batch_size], self.image_size)).float().cpu()
                   for i in range(0, len(self.images), self.batch_size)]
        finally:
            backbone.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def batch_stat_features(self, backbone: torch.nn.Module) -> torch.Tensor:
        norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
        was_training = backbone.training
        backbone.train()
        for m in norms:
            m.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
        try:
            return backbone(preprocess(self.images, self.image_size)).float().cpu()
        finally:
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
            backbone.train(was_training)

    def __call__(self, backbone: torch.nn.Module) -> dict[str, float]:
        metrics = collapse_metrics(self.features(backbone), self.pairs)
        metrics["feature_std_batch"] = feature_std(self.batch_stat_features(backbone))
        return metrics
