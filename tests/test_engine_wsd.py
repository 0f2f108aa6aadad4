"""Warmup-stable-decay: the schedule's values by hand, cooldown branches that leave the main
trajectory untouched, and exact resume through them."""

from __future__ import annotations

import math

import pytest
import torch

from cxrtune.engine import pretrain, read_metrics
from cxrtune.engine.checkpoint import checkpoint_path, load_checkpoint
from cxrtune.engine.cooldown import cooldown_steps, run_cooldown
from cxrtune.engine.schedules import WarmupStable, build_schedule, cooldown_lr
from cxrtune.engine.train import optimizer_step
from cxrtune.methods import Progress
from cxrtune.models.backbone import load_backbone
from cxrtune.profiles import smoke
from tests._engine_fixtures import blob_images, method_setup, one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_schedule_warms_up_then_holds_the_peak():
    s = WarmupStable(0.4, warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert [s.lr_at(k) for k in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert s.lr_at(19) == 0.4 and s.lr_at(500) == 0.4  # no decay on the main trajectory
    assert build_schedule("wsd", 0.4, 4, 20, 0.1).lr_at(19) == 0.4
    assert build_schedule("cosine", 0.4, 4, 20, 0.1).lr_at(19) < 0.05


def test_cooldown_learning_rates_worked_by_hand():
    # 4 steps from 1.0 to a floor of 0.2, at the midpoints x = 1/8, 3/8, 5/8, 7/8
    sqrt = [cooldown_lr(1.0, 0.2, k, 4, "sqrt") for k in range(4)]
    assert sqrt == pytest.approx([0.2 + 0.8 * (1 - math.sqrt(x)) for x in (0.125, 0.375, 0.625, 0.875)])
    assert sqrt == pytest.approx([0.717157, 0.510102, 0.367544, 0.251669], abs=1e-6)
    linear = [cooldown_lr(1.0, 0.0, k, 4, "linear") for k in range(4)]
    assert linear == pytest.approx([0.875, 0.625, 0.375, 0.125])
    assert cooldown_steps(0.15, 100) == 15 and cooldown_steps(0.15, 2) == 1  # at least one step
    with pytest.raises(ValueError, match="outside 0..3"):
        cooldown_lr(1.0, 0.0, 4, 4)


def test_a_branch_follows_the_cooldown_and_puts_every_state_back():
    config, method, optimizer, images = method_setup("moco")
    before = {k: v.clone() for k, v in method.state_dict().items()}
    before_lr = optimizer.param_groups[0]["lr"]
    seen = []

    def step(m, o, loss, where):
        seen.append(o.param_groups[0]["lr"])
        optimizer_step(m, o, loss, where)

    from cxrtune.augment import BatchAugment

    augment = BatchAugment(config.augment, config.train.image_size, torch.Generator().manual_seed(3))
    judged, loss = run_cooldown(method, optimizer, iter([images] * 5), augment, Progress(0, 9, 10, 2), 0.05, 0.0, 5,
                                "sqrt", step, False, torch.device("cpu"))
    assert seen == pytest.approx([cooldown_lr(0.05, 0.0, k, 5) for k in range(5)])
    assert math.isfinite(loss)
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, BN statistics, queue, key encoder
    assert optimizer.param_groups[0]["lr"] == before_lr
    trained = method.backbone.torchvision_state_dict()
    assert any(not torch.equal(judged[k], trained[k]) for k in judged)  # the branch did train


def _wsd(epochs: int = 4, every: int = 1):
    return smoke("moco").override({"train.epochs": epochs, "train.checkpoint_every": every, "train.keep_checkpoints": 5,
                                   "train.monitor_images": 8, "train.batch_size": 8, "optim.schedule": "wsd",
                                   "optim.cooldown_fraction": 0.5})


def _main_and_judged(path):
    payload = load_checkpoint(path)
    return payload["backbone"], payload["method_state"], payload["judged_backbone"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_judging_every_epoch_leaves_the_main_trajectory_as_judging_once(tmp_path):
    images = blob_images(16, 40)  # two steps per epoch: branches of 1, 2, 3 and 4 steps
    often = pretrain(_wsd(every=1), images, tmp_path / "often")
    once = pretrain(_wsd(every=4), images, tmp_path / "once")
    # a sweep's rungs (epochs 1 and 3) and the last epoch judged; the checkpoint at epoch 2 is for resuming
    rungs = pretrain(_wsd(every=2).override({"train.checkpoint_epochs": (1, 3)}), images, tmp_path / "rungs")
    assert [m.get("cooldown_steps") for m in often.metrics] == [1, 2, 3, 4]
    assert [m.get("cooldown_steps") for m in once.metrics] == [None, None, None, 4]
    assert [m.get("cooldown_steps") for m in rungs.metrics] == [1, None, 3, 4]
    assert [m["judged"] for m in rungs.metrics] == [True, False, True, True]
    assert "judged_backbone" not in load_checkpoint(checkpoint_path(tmp_path / "rungs", 2))
    assert _equal(_main_and_judged(rungs.checkpoint)[2], _main_and_judged(once.checkpoint)[2])
    main_a, rest_a, judged_a = _main_and_judged(often.checkpoint)
    main_b, rest_b, judged_b = _main_and_judged(once.checkpoint)
    assert _equal(main_a, main_b) and _equal(rest_a, rest_b)  # three branches changed nothing
    assert _equal(judged_a, judged_b)  # the final judgement does not depend on the earlier ones
    assert [m["ssl_loss"] for m in often.metrics] == [m["ssl_loss"] for m in once.metrics]
    # the checkpoint offers the branch's backbone; the main trajectory's is kept for the resume
    offered = load_backbone(often.checkpoint).torchvision_state_dict()
    assert _equal(offered, judged_a) and not _equal(judged_a, main_a)
    assert _equal(often.backbone.torchvision_state_dict(), judged_a)


def test_exact_resume_through_cooldown_branches(tmp_path):
    images = blob_images(16, 40)
    straight = pretrain(_wsd(), images, tmp_path / "straight")
    stopped = pretrain(_wsd(), images, tmp_path / "resumed", callback=lambda m: "stop" if m["epoch"] == 2 else None)
    assert stopped.status == "stopped"
    resumed = pretrain(_wsd(), images, tmp_path / "resumed")
    assert [m["epoch"] for m in resumed.metrics] == [3, 4]
    for a, b in zip(_main_and_judged(straight.checkpoint), _main_and_judged(resumed.checkpoint)):
        assert _equal(a, b)
    keys = ("ssl_loss", "cooldown_loss", "cooldown_steps")
    assert [[m[k] for k in keys] for m in read_metrics(tmp_path / "resumed")] == \
        [[m[k] for k in keys] for m in read_metrics(tmp_path / "straight")]
    # a finished run started again offers the same backbone
    again = pretrain(_wsd(), images, tmp_path / "resumed")
    assert again.metrics == [] and _equal(again.backbone.torchvision_state_dict(), _main_and_judged(straight.checkpoint)[2])
