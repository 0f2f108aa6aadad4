"""LARS: each step against a hand computation, the groups build_optimizer makes, exact resume."""

from __future__ import annotations

import pytest
import torch

from cxrtune.engine import PretrainConfig, pretrain
from cxrtune.profiles import smoke
from cxrtune.engine.checkpoint import load_checkpoint
from cxrtune.engine.lars import LARS
from cxrtune.methods import build_method
from cxrtune.models.backbone import build_backbone
from cxrtune.engine.train import build_optimizer
from tests._engine_fixtures import blob_images


def _reference_steps(p0, grads, lr, momentum, wd, eta, adapt):
    """The update rule written out step by step, in float64."""
    p, mu = p0.clone().double(), None
    for g in grads:
        update = g.double() + wd * p
        if adapt and p.norm() > 0 and update.norm() > 0:
            update = update * (eta * p.norm() / update.norm())
        mu = update.clone() if mu is None else momentum * mu + update
        p = p - lr * mu
    return p


@pytest.mark.parametrize("adapt,wd", [(True, 0.0), (True, 0.1), (False, 0.1)])
def test_lars_steps_match_the_update_rule(adapt, wd):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    param = torch.nn.Parameter(p0.clone())
    opt = LARS([{"params": [param], "adapt": adapt}], lr=0.5, momentum=0.9, weight_decay=wd, eta=0.02)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = _reference_steps(p0, grads, 0.5, 0.9, wd, 0.02, adapt)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-12)


def test_lars_trust_ratio_by_hand_and_zero_norm_parameters():
    # |p| = 5, |g| = 1: the step is lr * eta * 5 * g
    param = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    opt = LARS([param], lr=1.0, momentum=0.0, eta=0.1)
    param.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(param.detach(), torch.tensor([[3.0 - 0.3, 4.0 - 0.4]], dtype=torch.float64))
    # a zero-initialised tensor takes a plain SGD step (trust 1), not a zero one
    zero = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([zero], lr=0.1, momentum=0.0)
    zero.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(zero.detach(), torch.full((2, 2), -0.1))


def test_lars_refuses_bad_settings_by_name():
    p = [torch.nn.Parameter(torch.ones(2))]
    for kwargs, match in (({"lr": 0.0}, "lr = 0.0"), ({"lr": 0.1, "momentum": 1.0}, "momentum = 1.0"),
                          ({"lr": 0.1, "eta": 0.0}, "eta = 0.0"), ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay")):
        with pytest.raises(ValueError, match=match):
            LARS(p, **kwargs)


def test_build_optimizer_keeps_biases_and_norms_out_of_the_adaptation():
    config = smoke("barlow").override({"optim.optimizer": "lars", "optim.lars_eta": 0.02, "optim.weight_decay": 1e-3,
                                       "optim.exclude_norm_bias_decay": True})
    method = build_method(config.method, build_backbone("resnet18", "random", None, 1), config.method_config())
    opt = build_optimizer(method, config)
    assert isinstance(opt, LARS)
    adapted, plain = opt.param_groups
    assert adapted["adapt"] and adapted["weight_decay"] == 1e-3 and adapted["eta"] == 0.02
    assert not plain["adapt"] and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in adapted["params"]) and all(p.ndim <= 1 for p in plain["params"])
    assert len(plain["params"]) > 0  # BatchNorm weights and biases exist
    with pytest.raises(Exception, match="optimizer = .lamb. is not allowed: use one of .sgd., .adamw., .lars."):
        PretrainConfig().override({"optim.optimizer": "lamb"})


def test_lars_run_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = smoke("barlow").override({"optim.optimizer": "lars", "optim.lr": 0.2, "optim.exclude_norm_bias_decay": True,
                                           "train.epochs": 4, "train.checkpoint_every": 2, "train.monitor_images": 8,
                                           "train.batch_size": 8})
        images = blob_images(8, 40)
        straight = pretrain(config, images, tmp_path / "straight")
        pretrain(config, images, tmp_path / "resumed", callback=lambda m: "stop" if m["epoch"] == 2 else None)
        resumed = pretrain(config, images, tmp_path / "resumed")
        a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
        for key in a["backbone"]:
            assert torch.equal(a["backbone"][key], b["backbone"][key]), key
        assert a["optimizer"]["state"] and all("momentum_buffer" in s for s in a["optimizer"]["state"].values())
    finally:
        torch.set_num_threads(threads)


def test_a_checkpoint_from_before_a_new_setting_resumes_while_that_setting_keeps_its_default(tmp_path, monkeypatch):
    """Runs written before ``optim.lars_eta`` existed still resume; a changed value is refused."""
    from cxrtune.engine.checkpoint import list_checkpoints
    from cxrtune.models.backbone import CheckpointError

    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    config = smoke("moco").override({"train.epochs": 2, "train.checkpoint_every": 1, "train.monitor_images": 8,
                                     "train.batch_size": 8})
    images = blob_images(8, 40)
    pretrain(config, images, tmp_path / "run", callback=lambda m: "stop" if m["epoch"] == 1 else None)
    for _, path in list_checkpoints(tmp_path / "run"):  # as an older version wrote it
        payload = torch.load(path, weights_only=True)
        del payload["config"]["optim.lars_eta"]
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"optim.lars_eta: None -> 0.01"):
        pretrain(config.override({"optim.lars_eta": 0.01}), images, tmp_path / "run")
    resumed = pretrain(config, images, tmp_path / "run")
    assert resumed.epochs_completed == 2 and [m["epoch"] for m in resumed.metrics] == [2]
