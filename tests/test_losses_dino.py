"""DINO loss and centre update against plain-Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from cxrtune.losses import DinoLoss, dino_loss, updated_center


def _softmax(v, t):
    m = max(x / t for x in v)
    e = [math.exp(x / t - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def _loop_loss(students, teachers, center, ts, tt):
    total, pairs = 0.0, 0
    for i, t in enumerate(teachers):
        for j, s in enumerate(students):
            if i == j:
                continue
            batch = 0.0
            for b in range(len(t)):
                q = _softmax([a - c for a, c in zip(t[b], center)], tt)
                p = _softmax(s[b], ts)
                batch += -sum(qk * math.log(pk) for qk, pk in zip(q, p))
            total += batch / len(t)
            pairs += 1
    return total / pairs


def test_matches_a_plain_loop_with_local_crops():
    g = torch.Generator().manual_seed(0)
    students = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(4)]  # 2 global + 2 local
    teachers = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(5, generator=g, dtype=torch.float64) * 0.1
    got = dino_loss(students, teachers, center, 0.1, 0.04).item()
    want = _loop_loss([s.tolist() for s in students], [t.tolist() for t in teachers], center.tolist(), 0.1, 0.04)
    assert got == pytest.approx(want, rel=1e-5)


def test_uniform_outputs_give_log_k():
    # A collapsed, uniform student and teacher: cross-entropy is log K (the study's flat 5.42 ~ log 256 = 5.55).
    outs = [torch.zeros(4, 256), torch.zeros(4, 256)]
    assert dino_loss(outs, outs, torch.zeros(256), 0.1, 0.04).item() == pytest.approx(math.log(256), rel=1e-6)


def test_center_update_and_module_moves_centre():
    g = torch.Generator().manual_seed(2)
    teachers = [torch.randn(4, 3, generator=g) + 2.0, torch.randn(4, 3, generator=g) + 2.0]
    center = torch.zeros(1, 3)
    want = 0.9 * center + 0.1 * torch.cat(teachers).mean(0, keepdim=True)
    assert torch.allclose(updated_center(center, teachers, 0.9), want)
    module = DinoLoss(3, 0.1, 0.9)
    module(teachers, teachers, 0.04)
    assert torch.allclose(module.center, want)
    module.eval()
    module(teachers, teachers, 0.04)
    assert torch.allclose(module.center, want)  # evaluation does not move the centre


def test_teacher_entropy_is_that_of_the_centred_sharpened_distribution():
    from cxrtune.losses.dino import teacher_entropy

    g = torch.Generator().manual_seed(3)
    teachers = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(6, generator=g, dtype=torch.float64) * 0.1
    want = []
    for t in teachers:
        for row in t.tolist():
            z = [(v - c) / 0.04 for v, c in zip(row, center.tolist())]
            top = max(z)
            e = [math.exp(v - top) for v in z]
            p = [v / sum(e) for v in e]
            want.append(-sum(q * math.log(q) for q in p if q > 0))
    assert teacher_entropy(teachers, center, 0.04).item() == pytest.approx(sum(want) / len(want), rel=1e-6)  # float32
    # a uniform teacher is the maximum, ln K: the loss module reports it as a ratio of 1
    flat = [torch.zeros(4, 256), torch.zeros(4, 256)]
    out = DinoLoss(256)(flat, flat, 0.04)
    assert out["teacher_entropy_ratio"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["loss_uniform_ratio"].item() == pytest.approx(1.0, abs=1e-6)
