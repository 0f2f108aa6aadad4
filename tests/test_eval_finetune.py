"""Finetuning: seeded and exactly repeatable on the CPU, with the study's freezing rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxrtune.augment import AugmentConfig, BatchAugment
from cxrtune.evaluate.features import extract_features
from cxrtune.evaluate.finetune import FinetuneConfig, _Classifier, _freeze, finetune_episode
from cxrtune.evaluate.metrics import auroc
from cxrtune.evaluate.preprocess import PreprocessConfig
from cxrtune.models.backbone import build_backbone

TINY = PreprocessConfig(input_size=28)  # 32-px images, centre crop 28


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 32, 32), dtype=np.uint8)
    images[8:, 8:24, 8:24] = 250  # "positives" carry a bright square
    backbone = build_backbone("resnet18", "random", seed=0)
    episode = dict(train_rows=[8, 9, 0, 1], train_labels=[1, 1, 0, 0],
                   test_rows=[10, 11, 12, 13, 2, 3, 4, 5], test_labels=[1, 1, 1, 1, 0, 0, 0, 0])
    return images, backbone, episode


def test_finetune_repeats_exactly_and_depends_on_the_seed(setup):
    images, backbone, episode = setup
    config = FinetuneConfig(epochs=2, device="cpu", batch_size=2)
    first = finetune_episode(backbone, images, **episode, config=config, preprocessing=TINY, seed=7)
    second = finetune_episode(backbone, images, **episode, config=config, preprocessing=TINY, seed=7)
    other = finetune_episode(backbone, images, **episode, config=config, preprocessing=TINY, seed=8)
    assert first == second
    assert other["final_loss"] != first["final_loss"]
    assert set(first) == {"auroc", "accuracy", "f1", "final_loss"}


def test_prototype_head_is_the_nearest_class_mean_classifier(setup):
    images, backbone, episode = setup
    # With (almost) no learning, the finetuned model is its initialisation: the prototype head.
    config = FinetuneConfig(epochs=1, backbone_lr=0.0, head_lr=1e-12, augment=False, device="cpu")
    got = finetune_episode(backbone, images, **episode, config=config, preprocessing=TINY, seed=0)
    feats = extract_features(backbone, images, episode["train_rows"] + episode["test_rows"], TINY)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    train, test = feats[:4], feats[4:]
    pos, neg = train[:2].mean(0), train[2:].mean(0)
    score = -((test - pos) ** 2).sum(1) + ((test - neg) ** 2).sum(1)  # closer to the positive mean
    assert got["auroc"] == pytest.approx(auroc(episode["test_labels"], score), abs=1e-6)


def test_freezing_follows_the_stage_and_batchnorm_never_trains():
    model = _Classifier(build_backbone("resnet18", "random", seed=0))
    trainable = _freeze(model, "layer3")
    t = model.backbone.trunk
    assert not t.conv1.weight.requires_grad and not t.layer2[0].conv1.weight.requires_grad
    assert t.layer3[0].conv1.weight.requires_grad and t.layer4[1].conv2.weight.requires_grad
    assert all(not p.requires_grad for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert {id(p) for p in trainable} == {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert _freeze(model, "head") == []


def test_finetune_augmentation_is_seeded_per_image_and_normalised_as_its_preprocessing():
    """Finetuning draws its views from cxrtune.augment, normalised with the evaluation's mean and std."""
    batch = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(1, 32, 32), dtype=np.uint8)).repeat(4, 1, 1)
    views = [BatchAugment(AugmentConfig(), 28, torch.Generator().manual_seed(seed))(batch) for seed in (3, 3, 4)]
    assert views[0].shape == (4, 1, 28, 28) and torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])
    assert not torch.allclose(views[0][0], views[0][1])  # same image, different draws
    own = PreprocessConfig(input_size=28, crop_fraction=1.0, mean=0.3, std=0.5)
    ramp = torch.from_numpy(np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1)))[None]
    off = AugmentConfig(crop_scale_min=1.0, hflip_p=0, rotation_deg=0, jitter_p=0, blur_p=0, noise_std=0)
    plain = BatchAugment(off, 28, torch.Generator().manual_seed(0), mean=own.mean, std=own.std)(ramp)
    from cxrtune.evaluate.preprocess import preprocess
    full = preprocess(ramp, own)
    # with every random part switched off the view is a plain resize of the full image, normalised alike
    assert torch.allclose(plain[..., 2:-2, 2:-2], full[..., 2:-2, 2:-2], atol=0.05)
