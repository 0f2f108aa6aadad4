"""BYOL: the loss against plain loops and a hand-worked example, the target network as a
scheduled EMA of the online one (with a real ResNet18 at smoke size), and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cxrtune.augment import BatchAugment
from cxrtune.losses.byol import byol_loss, regression_loss
from cxrtune.methods import Progress
from cxrtune.methods.byol import Byol, ByolConfig
from cxrtune.models.backbone import build_backbone
from cxrtune.resolve import resolve_pretrain
from tests._engine_fixtures import mean_loss as _eval_loss, method_setup, one_torch_thread  # noqa: F401


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the loss -------------------------------------------------------------------------------------
def _loop_direction(p, t):
    """Batch mean of ||p_i / |p_i| - t_i / |t_i| ||^2, one sample and dimension at a time."""
    total = 0.0
    for p_i, t_i in zip(p, t):
        norm_p = math.sqrt(sum(x * x for x in p_i))
        norm_t = math.sqrt(sum(x * x for x in t_i))
        total += sum((x / norm_p - y / norm_t) ** 2 for x, y in zip(p_i, t_i))
    return total / len(p)


def _views(seed=0, n=7, d=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(4)]


def test_loss_matches_plain_loops_in_float64():
    p_a, t_b, p_b, t_a = _views()
    ab = _loop_direction(p_a.tolist(), t_b.tolist())
    ba = _loop_direction(p_b.tolist(), t_a.tolist())
    out = byol_loss(p_a, t_b, p_b, t_a)
    assert out["loss"].dtype == torch.float64
    assert out["loss_ab"].item() == pytest.approx(ab, rel=1e-9)
    assert out["loss_ba"].item() == pytest.approx(ba, rel=1e-9)
    assert out["loss"].item() == pytest.approx(ab + ba, rel=1e-9)  # the two directions summed, as the paper
    # the squared distance of the normalised vectors is 2 - 2 cos, sample by sample
    cos = [sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))
           for u, v in zip(p_a.tolist(), t_b.tolist())]
    assert regression_loss(p_a, t_b).tolist() == pytest.approx([2 - 2 * c for c in cos], rel=1e-9)


def test_loss_worked_by_hand():
    # per sample 2 - 2 cos: along the target 0, orthogonal 2, opposite 4 (norms do not matter)
    prediction = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[6.0, 8.0], [0.0, 5.0], [-2.0, 0.0]])
    assert regression_loss(prediction, target).tolist() == pytest.approx([0.0, 2.0, 4.0], abs=1e-6)
    # one direction's batch mean (0 + 2 + 4) / 3 = 2; the other direction, with targets of
    # prediction (1, 1) against (1, 0): cos = 1/sqrt(2), loss 2 - sqrt(2) for every sample
    other_p, other_t = torch.ones(3, 2), torch.tensor([[1.0, 0.0]] * 3)
    out = byol_loss(prediction, target, other_p, other_t)
    assert out["loss_ab"].item() == pytest.approx(2.0, rel=1e-6)
    assert out["loss_ba"].item() == pytest.approx(2 - math.sqrt(2), rel=1e-6)
    assert out["loss"].item() == pytest.approx(4 - math.sqrt(2), rel=1e-6)


def test_loss_is_symmetric_scale_free_and_sends_no_gradient_to_the_targets():
    p_a, t_b, p_b, t_a = _views(seed=1)
    swapped = byol_loss(p_b, t_a, p_a, t_b)["loss"].item()
    assert byol_loss(p_a, t_b, p_b, t_a)["loss"].item() == pytest.approx(swapped, rel=1e-12)
    assert regression_loss(p_a, t_b).tolist() == pytest.approx(regression_loss(t_b, p_a).tolist(), rel=1e-12)
    assert byol_loss(5 * p_a, 0.1 * t_b, p_b, 3 * t_a)["loss"].item() == pytest.approx(swapped, rel=1e-9)
    p_a, t_b, p_b, t_a = (x.float().requires_grad_() for x in (p_a, t_b, p_b, t_a))
    out = byol_loss(p_a, t_b, p_b, t_a)
    out["loss"].backward()
    assert p_a.grad is not None and p_b.grad is not None
    assert t_a.grad is None and t_b.grad is None
    assert not out["loss_ab"].requires_grad and not out["loss_ba"].requires_grad


@pytest.mark.parametrize("shape_p, shape_t", [((4, 3), (4, 2)), ((4, 3), (5, 3)), ((4,), (4,)), ((0, 3), (0, 3))])
def test_bad_shapes_are_refused_naming_them(shape_p, shape_t):
    def shown(shape):
        return r"\(" + r",\s*".join(str(s) for s in shape) + (r",?" if len(shape) == 1 else "") + r"\)"

    with pytest.raises(ValueError, match=rf"prediction {shown(shape_p)} and target {shown(shape_t)}"):
        byol_loss(torch.ones(shape_p), torch.ones(shape_t), torch.ones(4, 3), torch.ones(4, 3))


# -- the method -----------------------------------------------------------------------------------
def _paper_tau(tau_base, k, total):
    """The paper's schedule, written out: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * k / total) + 1) / 2


def test_momentum_follows_the_papers_cosine_schedule():
    method = Byol(build_backbone("resnet18"), ByolConfig(projector_hidden=32, projector_out=16, predictor_hidden=32))
    assert method.config.tau_base == 0.996
    for step, (epoch, per_epoch, epochs) in [(0, (0, 50, 4)), (50, (1, 50, 4)), (100, (2, 50, 4)), (150, (3, 50, 4)),
                                             (199, (3, 50, 4)), (200, (3, 50, 4))]:
        where = Progress(epoch=epoch, step=step, steps_per_epoch=per_epoch, epochs=epochs)
        assert method.momentum_at(where) == pytest.approx(_paper_tau(0.996, step, 200), abs=1e-12)
    assert method.momentum_at(Progress(2, 100, 50, 4)) == pytest.approx(0.998)  # halfway: (0.996 + 1) / 2
    assert method.momentum_at(Progress(3, 200, 50, 4)) == pytest.approx(1.0)


def test_the_predictor_is_online_only_and_the_target_copies_backbone_and_projector():
    _, method, optimizer, _ = _setup()
    names = dict(method.named_parameters())
    target = {n for n in names if n.startswith("target_")}
    online_twin = {n for n in names if n.startswith(("backbone.", "projector."))}
    assert {n.replace("target_", "", 1) for n in target} == online_twin  # no predictor in the target
    assert any(n.startswith("predictor.") for n in names)
    assert not any("predictor" in n for n in target)
    for n in target:  # a copy at the start
        assert torch.equal(names[n], names[n.replace("target_", "", 1)])
    assert [type(m) for m in method.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [type(m) for m in method.predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (method.projector[0].out_features, method.projector[-1].out_features) == (64, 32)  # smoke widths
    assert (method.predictor[0].in_features, method.predictor[0].out_features) == (32, 64)
    defaults = Byol(build_backbone("resnet18"), ByolConfig())
    assert (defaults.projector[0].out_features, defaults.projector[-1].out_features) == (4096, 256)
    assert (defaults.predictor[0].in_features, defaults.predictor[0].out_features) == (256, 4096)
    # the optimiser holds every online parameter and no target one
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for n, p in names.items() if not n.startswith("target_")}


def test_one_step_trains_the_online_network_only_and_moves_the_target_by_the_scheduled_ema():
    config, method, optimizer, images = _setup()
    assert config.byol.tau_base == 0.99
    # Set the target apart from the online network, so that target - online is not one tiny step
    # and a wrong tau (e.g. tau_base itself, 0.99) shows: (0.991464 - 0.99) * 0.05 >> atol.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in method.named_parameters():
            if name.startswith("target_"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    target_before = {n: p.detach().clone() for n, p in method.named_parameters() if n.startswith("target_")}
    online_before = {n: p.detach().clone() for n, p in method.named_parameters() if not n.startswith("target_")}
    # a step a quarter into training: tau = 1 - 0.01 (cos(pi / 4) + 1) / 2 = 0.991464
    where = Progress(epoch=0, step=5, steps_per_epoch=10, epochs=2)
    augment = BatchAugment(config.augment, config.train.image_size, torch.Generator().manual_seed(0))
    out = method.training_loss(images, augment, where)
    assert 0 < out["loss"].item() < 8
    assert out["target_momentum"].item() == pytest.approx(_paper_tau(0.99, 5, 20))
    optimizer.zero_grad()
    out["loss"].backward()
    for name, p in method.named_parameters():
        if name.startswith("target_"):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None, name  # backbone, projector and predictor all learn
    method.before_optimizer_step(where)
    optimizer.step()
    method.after_optimizer_step(where)
    tau = _paper_tau(0.99, 5, 20)
    assert tau == pytest.approx(0.991464, abs=1e-6)
    params = dict(method.named_parameters())
    moved = 0
    for name, old in target_before.items():
        online = params[name.replace("target_", "", 1)]
        assert torch.allclose(params[name], tau * old + (1 - tau) * online, atol=1e-6), name
        moved += not torch.allclose(params[name], 0.99 * old + 0.01 * online, atol=1e-6)
    assert moved == len(target_before)  # the unscheduled tau_base fits no target tensor
    assert any(not torch.equal(params[n], online_before[n]) for n in online_before if n.startswith("predictor."))


# -- its recipe ------------------------------------------------------------------------------------
def test_the_study_preset_is_the_papers_recipe_on_one_gpu():
    study = resolve_pretrain("study", "byol").pretrain
    assert study.optim.optimizer == "lars" and study.model.arch == "resnet50" and study.byol == ByolConfig()


def _setup(**overrides):
    return method_setup("byol", **overrides)
