"""Masked, per-patch-normalised MSE against a plain loop; visible patches must not count."""

from __future__ import annotations

import math

import pytest
import torch

from cxrtune.losses import masked_patch_mse, patchify


def _loop_loss(pred, target, mask, p):
    b, c, h, w = pred.shape
    total, count = 0.0, 0
    for n in range(b):
        for gy in range(h // p):
            for gx in range(w // p):
                if not mask[n, gy, gx]:
                    continue
                t = [target[n, ch, gy * p + y, gx * p + x].item() for y in range(p) for x in range(p) for ch in range(c)]
                q = [pred[n, ch, gy * p + y, gx * p + x].item() for y in range(p) for x in range(p) for ch in range(c)]
                mean = sum(t) / len(t)
                var = sum((v - mean) ** 2 for v in t) / (len(t) - 1)
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
                total += sum((a - b_) ** 2 for a, b_ in zip(q, t)) / len(t)
                count += 1
    return total / count


def test_patchify_orders_patches_row_major():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches = patchify(x, 2)
    assert patches.shape == (1, 4, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # top-right patch


def test_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    target = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    got = masked_patch_mse(pred, target, mask, 4).item()
    assert got == pytest.approx(_loop_loss(pred, target, mask, 4), rel=1e-5)


def test_only_masked_patches_count():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(1, 1, 8, 8, generator=g)
    mask = torch.tensor([[[True, False], [False, False]]])
    pred = torch.randn(1, 1, 8, 8, generator=g)
    before = masked_patch_mse(pred, target, mask, 4).item()
    changed = pred.clone()
    changed[..., 4:, :] = 1e3  # corrupt only visible patches
    assert masked_patch_mse(changed, target, mask, 4).item() == pytest.approx(before)
    # A perfect prediction of the normalised masked patch gives zero.
    t = patchify(target, 4)[0, 0]
    perfect = pred.clone()
    perfect[0, 0, :4, :4] = ((t - t.mean()) / torch.sqrt(t.var() + 1e-6)).reshape(4, 4)
    assert masked_patch_mse(perfect, target, mask, 4).item() < 1e-10
