"""BarlowTwins loss against a plain-Python cross-correlation."""

from __future__ import annotations

import math

import pytest
import torch

from cxrtune.losses import barlow_twins_loss, cross_correlation


def _loop_loss(a, b, lam, eps=1e-5):
    n, d = len(a), len(a[0])

    def standardise(z):
        cols = []
        for j in range(d):
            col = [z[i][j] for i in range(n)]
            mean = sum(col) / n
            var = sum((c - mean) ** 2 for c in col) / n
            cols.append([(c - mean) / math.sqrt(var + eps) for c in col])
        return cols  # cols[j][i]

    sa, sb = standardise(a), standardise(b)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(sa[i][k] * sb[j][k] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lam * c * c
    return loss


def test_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    got = barlow_twins_loss(a, b, 0.005)["loss"].item()
    assert got == pytest.approx(_loop_loss(a.tolist(), b.tolist(), 0.005), rel=1e-5)


def test_identical_decorrelated_views_give_near_zero_loss():
    # Two identical batches whose columns are orthogonal and standardised: C = I.
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    c = cross_correlation(z, z)
    assert torch.allclose(c, torch.eye(2), atol=1e-4)
    assert barlow_twins_loss(z, z)["loss"].item() < 1e-4


def test_is_symmetric_and_scale_invariant():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    ab = barlow_twins_loss(a, b)["loss"].item()
    assert barlow_twins_loss(b, a)["loss"].item() == pytest.approx(ab, rel=1e-5)
    assert barlow_twins_loss(a * 7 + 3, b)["loss"].item() == pytest.approx(ab, rel=1e-4)
