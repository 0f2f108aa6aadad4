"""Each method's mechanics with real encoders: losses fall, masks, queues, centres and EMA teachers."""

from __future__ import annotations


import pytest
import torch

from cxrtune.augment import BatchAugment
from cxrtune.engine.config import PretrainConfig
from cxrtune.methods import Progress, build_method, get_method, method_names
from cxrtune.methods.base import cosine_increase
from cxrtune.methods.spark import random_patch_mask
from cxrtune.models.backbone import build_backbone
from cxrtune.profiles import smoke
from cxrtune.resolve import resolve_pretrain
from tests._engine_fixtures import mean_loss as _eval_loss, method_setup as _setup, one_torch_thread  # noqa: F401
from tests._engine_fixtures import train_steps as _train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_barlow_loss_falls_on_two_views():
    # 16 projection dims: a batch of 16 can decorrelate them (a wider head needs a bigger batch);
    # milder views than the study's so that a dozen steps show the trend.
    mild = {"augment.crop_scale_min": 0.5, "augment.noise_std": 0.02, "augment.blur_p": 0.0}
    config, method, optimizer, images = _setup("barlow", **{"optim.lr": 3e-3, "barlow.projector_dims": [32, 16], **mild})
    before = _eval_loss(method, config, images)
    _train(method, config, optimizer, images, 12)
    assert _eval_loss(method, config, images) < 0.7 * before  # measured: 0.36


def test_spark_reconstruction_falls_and_the_encoder_sees_only_visible_patches():
    config, method, optimizer, images = _setup("spark", **{"optim.lr": 2e-3})
    seen = {}
    original = method.backbone.stage_features

    def spy(x):
        seen["input"] = x.detach().clone()
        return original(x)

    method.backbone.stage_features = spy
    generator = torch.Generator().manual_seed(7)
    augment = BatchAugment(config.augment, 32, generator)
    method.training_loss(images, augment, Progress(0, 0, 1, 1))
    view = BatchAugment(config.augment, 32, torch.Generator().manual_seed(7))(images)
    hidden = (seen["input"] == 0).reshape(16, 4, 8, 4, 8).all(dim=(2, 4))
    assert hidden.sum(dim=(1, 2)).tolist() == [round(0.6 * 16)] * 16  # exactly 10 of 16 patches per image
    pixel_hidden = hidden.repeat_interleave(8, 1).repeat_interleave(8, 2)
    assert torch.equal(seen["input"][:, 0][~pixel_hidden], view[:, 0][~pixel_hidden])
    method.backbone.stage_features = original
    before = _eval_loss(method, config, images)
    _train(method, config, optimizer, images, 30)
    after = _eval_loss(method, config, images)
    assert after < 0.9 * before  # measured: 1.11 -> 0.85


def test_patch_masks_are_independent_per_image():
    mask = random_patch_mask(64, 7, 0.6, torch.Generator().manual_seed(0))
    assert mask.sum(dim=(1, 2)).unique().tolist() == [29]
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 64


def test_dino_centre_moves_and_teacher_is_an_ema_of_the_student():
    config, method, optimizer, images = _setup("dino")
    teacher_before = [p.detach().clone() for p in method.teacher_backbone.parameters()]
    assert torch.count_nonzero(method.criterion.center) == 0
    _train(method, config, optimizer, images, 1)
    assert torch.count_nonzero(method.criterion.center) > 0
    m = method.momentum_at(Progress(epoch=1, step=0, steps_per_epoch=1, epochs=2))
    assert m == pytest.approx(0.99)  # cosine schedule starts at the configured momentum
    for old, teacher, student in zip(teacher_before, method.teacher_backbone.parameters(), method.backbone.parameters()):
        assert torch.allclose(teacher, m * old + (1 - m) * student, atol=1e-6)
    assert not any(p.requires_grad for p in method.teacher_backbone.parameters())


def test_dino_schedules():
    config = smoke("dino").override({"dino.warmup_teacher_temperature": 0.07, "dino.warmup_teacher_epochs": 30})
    method = build_method("dino", build_backbone("resnet18"), config.method_config())
    assert method.teacher_temperature(0) == pytest.approx(0.07)
    assert method.teacher_temperature(15) == pytest.approx(0.055)
    assert method.teacher_temperature(30) == pytest.approx(0.04)
    assert cosine_increase(0.99, 1.0, 0.5) == pytest.approx(0.995)
    assert cosine_increase(0.99, 1.0, 1.0) == pytest.approx(1.0)


def test_moco_queue_and_key_encoder():
    config, method, optimizer, images = _setup("moco")
    queue_before = method.queue.clone()
    key_before = [p.detach().clone() for p in method.key_backbone.parameters()]
    _train(method, config, optimizer, images, 1)
    assert int(method.queue_ptr) == 16
    changed = (method.queue != queue_before).any(dim=1)
    assert changed[:16].all() and not changed[16:].any()
    assert torch.allclose(method.queue[:16].norm(dim=1), torch.ones(16), atol=1e-5)
    for old, key, query in zip(key_before, method.key_backbone.parameters(), method.backbone.parameters()):
        assert torch.allclose(key, 0.99 * old + 0.01 * query, atol=1e-6)
    # The queue wraps around: 64 slots, 16 per step.
    _train(method, config, optimizer, images, 4)
    assert int(method.queue_ptr) == (16 * 5) % 64


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_resolves_its_presets_and_holds_its_own_block_only(name):
    """The registry's presets land in the resolved config with their provenance, the block is the
    method's own config class, and no other method's keys appear anywhere in the config."""
    entry = get_method(name)
    others = [m for m in method_names() if m != name]
    for profile, preset in (("cpu", "cpu"), ("smoke", "smoke"), ("study", "study")):
        resolved = resolve_pretrain(profile, name)
        block = resolved.pretrain.method_config()
        assert type(block) is entry.config and getattr(resolved.pretrain, name) is block
        budget = {k for layer in ("budget", "probe") for k, o in resolved.origin.items() if o == f"profile {profile}: {layer}"}
        for key, value in entry.preset(preset).items():
            if key in budget:
                continue  # the profile's budget wins over a method's preset (e.g. epochs)
            assert resolved.flat[key] == value, (profile, key)
            assert resolved.origin[key].startswith(f"method {name}: "), (profile, key)
            if key.startswith(f"{name}."):
                assert getattr(block, key.split(".", 1)[1]) == (tuple(value) if isinstance(value, list) else value)
        for flat in (resolved.flat, PretrainConfig(method=name).to_flat()):
            assert not [k for k in flat if k.split(".", 1)[0] in others], (profile, name)
        with pytest.raises(AttributeError, match="holds its method's block only"):
            getattr(resolved.pretrain, others[0])
    assert build_method(name, build_backbone("resnet18"), smoke(name).method_config()).name == name
