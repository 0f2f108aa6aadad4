"""VICReg: the loss against plain loops and a hand-worked example, the method's mechanics with a
real ResNet18 at smoke size, and its place in the registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cxrtune.augment import BatchAugment
from cxrtune.losses.vicreg import covariance_term, invariance_term, variance_term, vicreg_loss
from cxrtune.methods import Progress
from cxrtune.methods.vicreg import Vicreg, VicregConfig
from cxrtune.models.backbone import build_backbone
from cxrtune.resolve import resolve_pretrain
from tests._engine_fixtures import mean_loss as _eval_loss, method_setup, one_torch_thread  # noqa: F401


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the loss -------------------------------------------------------------------------------------
def _loop_terms(a, b, gamma=1.0, eps=1e-4):
    """(invariance, variance, covariance) from the definitions, one sample and dimension at a time."""
    n, d = len(a), len(a[0])
    invariance = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def hinge(z):  # v(Z) = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps)), unbiased variance
        total = 0.0
        for j in range(d):
            mean = sum(z[i][j] for i in range(n)) / n
            var = sum((z[i][j] - mean) ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, gamma - math.sqrt(var + eps))
        return total / d

    def offdiag(z):  # c(Z) = 1/d sum_{k != l} C_kl^2, C = centred z^T z / (n - 1)
        means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        total = 0.0
        for k in range(d):
            for l in range(d):
                if k != l:
                    c = sum((z[i][k] - means[k]) * (z[i][l] - means[l]) for i in range(n)) / (n - 1)
                    total += c * c
        return total / d

    return invariance, (hinge(a) + hinge(b)) / 2, offdiag(a) + offdiag(b)


def _pair(seed=0, n=9, d=6):
    g = torch.Generator().manual_seed(seed)
    # per-dimension scales on both sides of gamma = 1, so some hinges are active and some are not
    scale = torch.tensor([0.3, 0.6, 0.9, 1.2, 2.0, 0.5], dtype=torch.float64)[:d]
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    b = a + 0.4 * torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    return a, b


def test_loss_matches_plain_loops_in_float64():
    a, b = _pair()
    inv, var, cov = _loop_terms(a.tolist(), b.tolist())
    assert 0 < var < 1  # the hinge is active on some dimensions only
    out = vicreg_loss(a, b, 25.0, 25.0, 1.0)
    assert out["loss"].dtype == torch.float64
    assert out["invariance"].item() == pytest.approx(inv, rel=1e-9)
    assert out["variance"].item() == pytest.approx(var, rel=1e-9)
    assert out["covariance"].item() == pytest.approx(cov, rel=1e-9)
    assert out["loss"].item() == pytest.approx(25 * inv + 25 * var + 1 * cov, rel=1e-9)
    # other weights, and each term's own function
    assert vicreg_loss(a, b, 2.0, 3.0, 0.5)["loss"].item() == pytest.approx(2 * inv + 3 * var + 0.5 * cov, rel=1e-9)
    assert invariance_term(a, b).item() == pytest.approx(inv, rel=1e-9)
    assert (variance_term(a) + variance_term(b)).item() / 2 == pytest.approx(var, rel=1e-9)
    assert (covariance_term(a) + covariance_term(b)).item() == pytest.approx(cov, rel=1e-9)


def test_loss_worked_by_hand():
    # n = 2, d = 2. z_a = [[0, 0], [1, 1]], z_b = [[0, 1], [1, 0]].
    # invariance: differences (0, -1) and (0, 1): (0 + 1 + 0 + 1) / 4 = 0.5.
    # variance: every column is {0, 1}: unbiased variance 0.5, std sqrt(0.5 + 1e-4) = 0.70718;
    #   hinge 1 - 0.70718 = 0.29282 in every dimension of both branches; their mean is the same.
    # covariance: z_a centred is [[-.5, -.5], [.5, .5]], C = [[.5, .5], [.5, .5]]; z_b gives
    #   [[.5, -.5], [-.5, .5]]; each branch (0.25 + 0.25) / d = 0.25, summed: 0.5.
    z_a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z_b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    hinge = 1 - math.sqrt(0.5 + 1e-4)
    out = vicreg_loss(z_a, z_b)
    assert out["invariance"].item() == pytest.approx(0.5, rel=1e-6)
    assert out["variance"].item() == pytest.approx(hinge, rel=1e-6)
    assert out["covariance"].item() == pytest.approx(0.5, rel=1e-6)
    assert out["loss"].item() == pytest.approx(25 * 0.5 + 25 * hinge + 0.5, rel=1e-6)  # 20.3205


def test_a_collapsed_batch_pays_the_full_variance_hinge_and_no_covariance():
    z = torch.ones(8, 4)
    out = vicreg_loss(z, z)
    assert out["invariance"].item() == 0 and out["covariance"].item() == 0
    assert out["variance"].item() == pytest.approx(1 - math.sqrt(1e-4), rel=1e-6)  # 0.99


def test_loss_is_symmetric_and_its_terms_are_detached():
    a, b = _pair(seed=3)
    ab, ba = vicreg_loss(a, b), vicreg_loss(b, a)
    for key in ("loss", "invariance", "variance", "covariance"):
        assert ab[key].item() == pytest.approx(ba[key].item(), rel=1e-12)
    a32 = a.float().requires_grad_()
    out = vicreg_loss(a32, b.float())
    assert out["loss"].requires_grad and out["loss"].dtype == torch.float32
    assert not any(out[k].requires_grad for k in ("invariance", "variance", "covariance"))


def _re_shape(shape):
    """A regex for a shape tuple as Python prints it."""
    return r"\(" + r",\s*".join(str(s) for s in shape) + (r",?" if len(shape) == 1 else "") + r"\)"


@pytest.mark.parametrize("shape_a, shape_b", [((4, 3), (4, 2)), ((4, 3), (5, 3)), ((1, 3), (1, 3)), ((4,), (4,)),
                                              ((2, 4, 3), (2, 4, 3))])
def test_bad_shapes_are_refused_naming_them(shape_a, shape_b):
    with pytest.raises(ValueError, match=rf"z_a {_re_shape(shape_a)} and z_b {_re_shape(shape_b)}"):
        vicreg_loss(torch.zeros(shape_a), torch.zeros(shape_b))


def test_single_branch_terms_refuse_bad_shapes():
    with pytest.raises(ValueError, match=r"z \(1, 3\)"):
        variance_term(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"z \(5,\)"):
        covariance_term(torch.zeros(5))


# -- the method -----------------------------------------------------------------------------------
def test_expander_is_linear_bn_relu_twice_then_a_linear_without_bias():
    method = Vicreg(build_backbone("resnet18"), VicregConfig(expander_dims=(32, 32, 16)))
    kinds = [type(m) for m in method.expander]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    widths = [(m.in_features, m.out_features) for m in method.expander if isinstance(m, nn.Linear)]
    assert widths == [(512, 32), (32, 32), (32, 16)]
    assert all(m.bias is None for m in method.expander if isinstance(m, nn.Linear))
    assert VicregConfig().expander_dims == (8192, 8192, 8192)


def test_vicreg_loss_falls_on_two_views_and_both_branches_get_gradients():
    # milder views than the smoke preset's, so that a dozen steps show the trend (as for BarlowTwins)
    mild = {"augment.crop_scale_min": 0.5, "augment.noise_std": 0.02, "augment.blur_p": 0.0}
    config, method, optimizer, images = _setup(**{"optim.lr": 3e-3, "vicreg.expander_dims": [64, 32], **mild})
    before = _eval_loss(method, config, images)
    augment = BatchAugment(config.augment, config.train.image_size, torch.Generator().manual_seed(0))
    for step in range(12):
        where = Progress(epoch=0, step=step, steps_per_epoch=12, epochs=1)
        out = method.training_loss(images, augment, where)
        assert set(out) == {"loss", "invariance", "variance", "covariance"}
        optimizer.zero_grad()
        out["loss"].backward()
        if step == 0:  # no stop-gradient anywhere: every parameter of encoder and expander learns
            assert all(p.grad is not None for p in method.parameters())
        optimizer.step()
    after = _eval_loss(method, config, images)
    assert after < 0.92 * before  # measured: 0.84 (22.2 -> 18.7; invariance 0.23 -> 0.18, variance 0.66 -> 0.51)


# -- its recipe ------------------------------------------------------------------------------------
def test_the_study_preset_is_the_papers_recipe_on_one_gpu():
    study = resolve_pretrain("study", "vicreg").pretrain
    assert study.optim.optimizer == "lars" and study.model.arch == "resnet50" and study.vicreg == VicregConfig()


def _setup(**overrides):
    return method_setup("vicreg", **overrides)
