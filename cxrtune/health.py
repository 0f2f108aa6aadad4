"""Trial health: decide from monitor metrics whether a pretraining has collapsed.

A collapsed backbone maps every image to nearly the same feature vector: the per-dimension std of
its features falls and the effective rank drops towards 1 (the study's plain MoCo went from a
feature std of 0.363 to 0.060). The sweep stops such trials early and marks them ``collapsed``
rather than spending GPU hours on them; thresholds live in :class:`HealthConfig` so a sweep can
tune or disable them (0 disables a check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from cxrtune.config import Config, param

STATUSES = ("completed", "pruned", "collapsed", "diverged", "errored")


@dataclass
class HealthConfig(Config):
    min_feature_std: float = param(0.01, low=0.0, doc="collapsed below this mean per-dimension feature std (0 = off)")
    min_effective_rank: float = param(2.0, low=0.0, doc="collapsed below this effective rank (0 = off)")
    max_mean_cosine: float = param(0.995, low=0.0, high=1.0, doc="collapsed above this mean pairwise cosine (1 = off)")
    grace_epochs: int = param(1, low=0, doc="epochs before the checks apply (early features of a random init can be odd)")


def collapse_reason(metrics: Mapping[str, Any], config: HealthConfig, epoch: int) -> str | None:
    """A human-readable reason when ``metrics`` show collapse, else None."""
    if epoch < config.grace_epochs:
        return None
    std = metrics.get("feature_std")
    rank = metrics.get("effective_rank")
    cosine = metrics.get("mean_cosine")
    if std is not None and config.min_feature_std > 0 and (not math.isfinite(std) or std < config.min_feature_std):
        return f"feature_std {std:.4g} < {config.min_feature_std:g}"
    if rank is not None and config.min_effective_rank > 0 and (not math.isfinite(rank) or rank < config.min_effective_rank):
        return f"effective_rank {rank:.4g} < {config.min_effective_rank:g}"
    if cosine is not None and config.max_mean_cosine < 1 and cosine > config.max_mean_cosine:
        return f"mean_cosine {cosine:.4g} > {config.max_mean_cosine:g}"
    return None
