"""Feature extraction: the study's preprocessing, the on-disk cache, and bad backbones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from cxrtune.errors import DataError
from cxrtune.evaluate.features import (
    BackboneSpec, ExtractConfig, FeatureError, cached_features, extract_features, images_identity,
)
from cxrtune.evaluate.preprocess import XRAY_MEAN, XRAY_STD, PreprocessConfig, preprocess
from cxrtune.models.backbone import CheckpointError, build_backbone, save_backbone

SMALL = PreprocessConfig(input_size=56)  # 64-px cache, crop 56 = 64 * 224/256: no resampling


@pytest.fixture()
def images():
    return np.random.default_rng(0).integers(0, 256, size=(10, 64, 64), dtype=np.uint8)


def test_preprocess_is_the_studys_centre_crop_and_xray_normalisation(images):
    batch = torch.from_numpy(images[:2])
    out = preprocess(batch, SMALL)
    assert out.shape == (2, 1, 56, 56)
    expected = (images[:2, 4:60, 4:60].astype(np.float32) / 255 - XRAY_MEAN) / XRAY_STD
    np.testing.assert_allclose(out[:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    big = preprocess(torch.from_numpy(np.full((1, 256, 256), 255, np.uint8)), PreprocessConfig())
    assert big.shape == (1, 1, 224, 224)  # 256 -> crop 224, as the study
    resized = preprocess(batch, PreprocessConfig(input_size=32))
    assert resized.shape == (2, 1, 32, 32) and preprocess(batch, SMALL, in_chans=3).shape == (2, 3, 56, 56)


def test_extraction_keeps_row_order_and_matches_a_direct_forward(images):
    backbone = build_backbone("resnet18", "random", seed=0).eval()
    rows = [7, 2, 2, 5]
    feats = extract_features(backbone, images, rows, SMALL, ExtractConfig(batch_size=3, device="cpu"))
    with torch.no_grad():
        direct = backbone(preprocess(torch.from_numpy(images[rows]), SMALL)).numpy()
    assert feats.shape == (4, 512) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="outside"):
        extract_features(backbone, images, [10], SMALL)


def test_feature_cache_extracts_once_and_keys_on_backbone_images_and_preprocessing(images, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path))
    spec = BackboneSpec(init="random", arch="resnet18", seed=1)
    rows, first, meta = cached_features(spec, images, [3, 1, 3], SMALL, ExtractConfig(device="cpu"))
    assert rows.tolist() == [1, 3] and not meta["cached"]
    files = sorted(p.name for p in (tmp_path / "features").iterdir())
    assert files == [f"{meta['key']}.json", f"{meta['key']}.npy"]
    assert json.loads((tmp_path / "features" / f"{meta['key']}.json").read_text())["backbone_identity"] == spec.identity()
    _, again, meta2 = cached_features(spec, images, [1, 3], SMALL, ExtractConfig(device="cpu"))
    assert meta2["cached"] and np.array_equal(first, again)
    other_seed = cached_features(BackboneSpec(init="random", arch="resnet18", seed=2), images, [1, 3], SMALL)[2]
    other_crop = cached_features(spec, images, [1, 3], PreprocessConfig(input_size=48, crop_fraction=0.75))[2]
    other_images = cached_features(spec, images[::-1].copy(), [1, 3], SMALL)[2]
    keys = {meta["key"], other_seed["key"], other_crop["key"], other_images["key"]}
    assert len(keys) == 4 and not any(m["cached"] for m in (other_seed, other_crop, other_images))
    assert images_identity(images) == images_identity(images.copy())


def test_checkpoints_are_keyed_by_content_and_bad_ones_are_named(images, tmp_path):
    path = save_backbone(build_backbone("resnet18", "random", seed=0), tmp_path / "moco.pt", {"method": "moco"})
    spec = BackboneSpec(init=str(path), arch="resnet18")
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    assert spec.identity() == BackboneSpec(init=str(copy), arch="resnet18").identity()
    assert spec.build().arch == "resnet18" and spec.label() == "moco"
    with pytest.raises(CheckpointError, match="resnet18 backbone, not the requested resnet50"):
        BackboneSpec(init=str(path), arch="resnet50").build()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 this is not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        BackboneSpec(init=str(corrupt), arch="resnet18").build()
    foreign = tmp_path / "foreign.pt"
    torch.save({"queue": torch.zeros(3), "epoch": 5}, foreign)  # another method's training state
    with pytest.raises(CheckpointError, match="not a cxrtune checkpoint"):
        BackboneSpec(init=str(foreign), arch="resnet18").build()
    with pytest.raises(CheckpointError, match="does not exist"):
        BackboneSpec(init=str(tmp_path / "missing.pt")).identity()


def test_imagenet_weights_from_a_local_file(tmp_path):
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    spec = BackboneSpec(init="imagenet", arch="resnet18", weights=str(weights))
    assert spec.identity().startswith("imagenet-resnet18-") and spec.build().feature_dim == 512
    wrong = BackboneSpec(init="imagenet", arch="resnet50", weights=str(weights))
    with pytest.raises(CheckpointError, match="does not match resnet50"):
        wrong.build()


def test_nan_features_are_refused_and_nothing_is_cached(images, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path))
    backbone = build_backbone("resnet18", "random", seed=0)
    with torch.no_grad():
        backbone.trunk.layer4[1].conv2.weight.fill_(float("nan"))
    spec = BackboneSpec(init="random", arch="resnet18", seed=0)
    with pytest.raises(FeatureError, match="NaN"):
        cached_features(spec, images, [0, 1], SMALL, backbone=backbone)
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())
