"""InfoNCE with a queue and the variance hinge, against plain-Python loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cxrtune.losses import MocoLoss, info_nce, variance_hinge


def _loop_info_nce(q, k, queue, t):
    total = 0.0
    for i in range(len(q)):
        pos = sum(a * b for a, b in zip(q[i], k[i])) / t
        negs = [sum(a * b for a, b in zip(q[i], n)) / t for n in queue]
        denom = math.exp(pos) + sum(math.exp(v) for v in negs)
        total += -(pos - math.log(denom))
    return total / len(q)


def _loop_variance_hinge(z, target, eps):
    n, d = len(z), len(z[0])
    total = 0.0
    for j in range(d):
        col = [z[i][j] for i in range(n)]
        mean = sum(col) / n
        var = sum((c - mean) ** 2 for c in col) / (n - 1)
        total += max(0.0, target - math.sqrt(var + eps))
    return total / d


def test_info_nce_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    got = info_nce(q, k, queue, 0.2).item()
    assert got == pytest.approx(_loop_info_nce(q.tolist(), k.tolist(), queue.tolist(), 0.2), rel=1e-5)


def test_info_nce_hand_worked_case():
    # q = k = e1, one negative e2, t = 1: loss = -log(e / (e + 1)).
    q = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0]])
    assert info_nce(q, q, queue, 1.0).item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)


def test_variance_hinge_matches_a_plain_loop_and_is_zero_when_spread():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64) * torch.tensor([0.1, 0.5, 3.0], dtype=torch.float64)
    got = variance_hinge(z, 1.0, 1e-4).item()
    assert got == pytest.approx(_loop_variance_hinge(z.tolist(), 1.0, 1e-4), rel=1e-5)
    assert variance_hinge(torch.randn(256, 8, generator=g) * 10).item() == 0.0


def test_moco_loss_adds_the_weighted_hinge_on_raw_projections():
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(8, 4, generator=g) * 0.05  # small raw projections: hinge active
    key = F.normalize(torch.randn(8, 4, generator=g), dim=1)
    queue = F.normalize(torch.randn(16, 4, generator=g), dim=1)
    plain = MocoLoss(0.07, variance_weight=0.0)(raw, key, queue)
    weighted = MocoLoss(0.07, variance_weight=2.0)(raw, key, queue)
    hinge = _loop_variance_hinge(raw.double().tolist(), 1.0, 1e-4)
    assert hinge > 0.9
    assert weighted["loss"].item() == pytest.approx(plain["loss"].item() + 2.0 * hinge, rel=1e-5)
    # Scaling the raw projections changes the hinge but not InfoNCE (it sees normalised q).
    scaled = MocoLoss(0.07, variance_weight=0.0)(raw * 100, key, queue)
    assert scaled["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-5)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="queue"):
        info_nce(torch.ones(2, 4), torch.ones(2, 4), torch.ones(3, 5), 0.1)
    with pytest.raises(ValueError, match="batch"):
        variance_hinge(torch.ones(1, 4))
