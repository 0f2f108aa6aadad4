"""Backbone options the engine relies on: ImageNet weights either way, offline error,
gradient checkpointing, stage features."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cxrtune.engine import pretrain
from cxrtune.models.backbone import Backbone, CheckpointError, build_backbone
from cxrtune.profiles import smoke
from tests._engine_fixtures import blob_images, one_torch_thread  # noqa: F401


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_imagenet_format_weights_load_into_grey_and_rgb_stems_alike(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    grey = build_backbone("resnet18", "imagenet", weights=path, in_chans=1).eval()
    rgb = build_backbone("resnet18", "imagenet", weights=path, in_chans=3).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        want = torch.nn.Sequential(*list(reference.children())[:-1]).eval()(x.repeat(1, 3, 1, 1)).flatten(1)
        assert torch.allclose(rgb(x), want, atol=1e-5)      # grey replicated to RGB
        assert torch.allclose(grey(x), want, atol=1e-4)     # RGB filters summed: same response


def test_imagenet_offline_names_the_file_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"resnet18-.*\.pth.*--weights PATH"):
        build_backbone("resnet18", "imagenet")


def test_gradient_checkpointing_changes_memory_not_results():
    torch.manual_seed(0)
    a = Backbone("resnet18")
    b = Backbone("resnet18")
    b.load_state_dict(a.state_dict())
    b.grad_checkpointing = True
    x = torch.randn(4, 1, 32, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name


def test_stage_features_have_the_resnet_strides():
    feats = Backbone("resnet18").stage_features(torch.zeros(2, 1, 64, 64))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == [64, 64, 128, 256, 512]


def test_pretraining_can_start_from_a_cxrtune_checkpoint(tmp_path):
    images = blob_images(8, 40)
    small = {"train.epochs": 1, "train.monitor_images": 8, "train.batch_size": 8}
    first = pretrain(smoke("moco").override(small), images, tmp_path / "a")
    config = smoke("barlow").override({**small, "model.init": str(first.checkpoint)})
    second = pretrain(config, images, tmp_path / "b")
    assert second.epochs_completed == 1
