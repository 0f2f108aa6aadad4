"""Collapse monitors against numpy, and the learning-rate schedule against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxrtune.engine.monitors import CollapseMonitor, effective_rank, feature_std, mean_cosine, random_pairs
from cxrtune.engine.schedules import WarmupCosine
from cxrtune.models.backbone import Backbone
from tests._engine_fixtures import blob_images


def test_metrics_match_numpy():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(20, 6)) * np.array([1, 2, 3, 0.1, 0.5, 1])
    t = torch.from_numpy(f)
    assert feature_std(t) == pytest.approx(np.mean(np.std(f, axis=0, ddof=1)))
    s = np.linalg.svd(f - f.mean(0), compute_uv=False)
    p = s / s.sum()
    assert effective_rank(t) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    i, j = random_pairs(20, 50, seed=3)
    assert bool((i != j).all())
    cos = [f[a] @ f[b] / np.linalg.norm(f[a]) / np.linalg.norm(f[b]) for a, b in zip(i.tolist(), j.tolist())]
    assert mean_cosine(t, (i, j)) == pytest.approx(np.mean(cos))


def test_collapsed_features_read_as_collapsed():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=8)
    collapsed = torch.from_numpy(np.outer(rng.normal(1, 0.01, 30), direction))
    assert effective_rank(collapsed) == pytest.approx(1.0, abs=1e-6)
    assert mean_cosine(collapsed, random_pairs(30, 100)) == pytest.approx(1.0)
    spread = torch.from_numpy(rng.normal(size=(200, 8)))
    assert effective_rank(spread) > 7 and abs(mean_cosine(spread, random_pairs(200, 500))) < 0.1


def test_monitor_leaves_the_backbone_in_training_mode_and_its_bn_untouched():
    torch.manual_seed(0)
    backbone = Backbone("resnet18")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    monitor = CollapseMonitor(blob_images(12, 40), 32, torch.device("cpu"), pairs=20)
    metrics = monitor(backbone)
    assert set(metrics) == {"feature_std", "effective_rank", "mean_cosine", "feature_std_batch"}
    assert backbone.training
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_warmup_cosine_hand_worked():
    s = WarmupCosine(1.0, warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [s.lr_at(k) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr_at(4) == pytest.approx(1.0)
    assert s.lr_at(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert s.lr_at(14) == pytest.approx(0.1)
    assert s.lr_at(100) == pytest.approx(0.1)
