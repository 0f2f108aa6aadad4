"""Trial health: decide from monitor metrics whether a pretraining has collapsed.

A collapsed backbone maps every image to nearly the same feature vector: the per-dimension std of
its features falls and the effective rank drops towards 1 (the study's plain MoCo went from a
feature std of 0.363 to 0.060). The sweep stops such trials early and marks them ``collapsed``
rather than spending GPU hours on them; thresholds live in :class:`HealthConfig` so a sweep can
tune or disable them (0 disables a check).

The std check reads ``feature_std_batch`` when the engine reports it: the std of features computed
with BatchNorm on the monitor set's own statistics. The study-style ``feature_std``,
``effective_rank`` and ``mean_cosine`` use eval-mode BatchNorm, whose running statistics lag a
network that is changing fast: in the first epochs of a run they read like collapse (rank near 1,
cosine near 1) when nothing has collapsed. So the rank and cosine checks are off by default and
the std check waits ``grace_epochs``.

DINO collapses another way: to a uniform output (every image the same flat distribution over the
prototypes, the loss at about ln(out_dim), as in the study's run). Its loss reports the teacher's
entropy over ln(out_dim) (``teacher_entropy_ratio``), and a ratio at ``max_uniform_ratio`` or
above after the grace epochs marks the trial collapsed.
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
    min_effective_rank: float = param(0.0, low=0.0, doc="collapsed below this effective rank (0 = off)")
    max_mean_cosine: float = param(1.0, low=0.0, high=1.0, doc="collapsed above this mean pairwise cosine (1 = off)")
    grace_epochs: int = param(2, low=0, doc="epochs before the checks apply (eval-mode monitors lag early on)")
    max_uniform_ratio: float = param(0.98, low=0.0, high=1.0,
                                     doc="collapsed when a method's output is this close to uniform: DINO's teacher "
                                         "entropy over ln(out_dim), an epoch's mean (1 = off)")


def collapse_reason(metrics: Mapping[str, Any], config: HealthConfig, epoch: int) -> str | None:
    """A human-readable reason when ``metrics`` show collapse, else None."""
    if epoch < config.grace_epochs:
        return None
    std = metrics.get("feature_std_batch", metrics.get("feature_std"))
    rank = metrics.get("effective_rank")
    cosine = metrics.get("mean_cosine")
    if std is not None and config.min_feature_std > 0 and (not math.isfinite(std) or std < config.min_feature_std):
        return f"feature_std {std:.4g} < {config.min_feature_std:g}"
    if rank is not None and config.min_effective_rank > 0 and (not math.isfinite(rank) or rank < config.min_effective_rank):
        return f"effective_rank {rank:.4g} < {config.min_effective_rank:g}"
    if cosine is not None and config.max_mean_cosine < 1 and cosine > config.max_mean_cosine:
        return f"mean_cosine {cosine:.4g} > {config.max_mean_cosine:g}"
    uniform = metrics.get("teacher_entropy_ratio")
    if uniform is not None and config.max_uniform_ratio < 1 and (not math.isfinite(uniform)
                                                                 or uniform >= config.max_uniform_ratio):
        loss = metrics.get("loss_uniform_ratio")
        also = f"; the loss is {loss:.3f} ln(out_dim)" if loss is not None else ""
        return (f"uniform output: teacher entropy {uniform:.3f} ln(out_dim) >= {config.max_uniform_ratio:g}{also} "
                "(every image gets the same flat distribution)")
    return None


def trial_status(result: dict | None, failed: bool) -> str:
    """A finished trial's final status (completed | pruned | collapsed | diverged | errored) from
    its last result; shared by the sweep's MLflow callback and the reports."""
    if failed:
        return "errored"
    result = result or {}
    status = result.get("trial_status")
    if status in ("collapsed", "diverged", "errored"):
        return status
    return "completed" if result.get("final") else "pruned"
