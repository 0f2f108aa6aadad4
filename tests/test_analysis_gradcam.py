"""Grad-CAM through a fitted logistic head, on a tiny ResNet on CPU, against a hand-written
Grad-CAM (autograd on the last stage) and the head against scikit-learn."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from cxrtune.analysis.gradcam import GradcamConfig, HeadedBackbone, fit_head, gradcam_maps, headed_backbone
from cxrtune.errors import TaskError
from cxrtune.evaluate.preprocess import preprocess
from cxrtune.models.backbone import Backbone


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _images(n: int = 16, side: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = (rng.random((n, side, side)) * 120).astype(np.uint8)
    images[: n // 2, 8:24, 36:52] = 250  # positives carry a bright square at a known place
    return images


def test_head_matches_scikit_learn_on_normalised_features():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(40, 6))
    labels = (feats[:, 0] + 0.3 * rng.normal(size=40) > 0).astype(int)
    weight, bias = fit_head(feats, labels, C=1.0)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(unit, labels)
    assert np.allclose(weight, ref.coef_[0], atol=1e-5) and bias == pytest.approx(ref.intercept_[0], abs=1e-5)
    with pytest.raises(TaskError, match="both classes"):
        fit_head(feats, np.ones(40), C=1.0)


def test_gradcam_equals_a_hand_written_gradcam_of_the_last_stage():
    torch.manual_seed(0)
    backbone = Backbone("resnet18").eval()
    images = _images()
    config = GradcamConfig(input_size=64, batch_size=8)
    model = headed_backbone(backbone, images, range(8), range(8, 16), config)
    maps = gradcam_maps(model, images, [0, 1, 9], config)
    assert maps.shape == (3, 64, 64) and maps.min() >= 0 and maps.max() <= 1 + 1e-6

    x = preprocess(torch.from_numpy(images[[0, 1, 9]]), config.preprocessing())
    activations = backbone.feature_map(x)
    activations.retain_grad()
    logit = torch.nn.functional.normalize(activations.mean(dim=(2, 3)), dim=1) @ model.weight + model.bias
    logit.sum().backward()
    weights = activations.grad.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * activations).sum(dim=1)).detach().numpy()
    for cam, got in zip(cams, maps):
        cam = cam - cam.min()
        cam = cam / (cam.max() + 1e-7)
        expected = cv2.resize(cam.astype(np.float32), (64, 64))  # the package's upsampling
        assert np.allclose(got, expected, atol=1e-4)


def test_headed_backbone_outputs_one_logit_per_image():
    backbone = Backbone("resnet18")
    model = HeadedBackbone(backbone, torch.ones(512), 0.5).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 1)


def test_localise_scores_nih_style_boxes_end_to_end(tmp_path):
    """A tiny NIH-like cache (1024 px originals, boxes in BBox_List_2017.csv): heads are fitted, the
    heatmaps scored against the boxes mapped to the cache, and the example panel holds the same mask."""
    import pandas as pd

    from _analysis_fixtures import FakeCache
    from cxrtune.analysis.ground_truth import GroundTruth
    from cxrtune.analysis.localisation import boxes_to_mask, energy_inside, pointing_hit
    from cxrtune.analysis.localise import BackboneEntry, localise

    side = 32
    ids = [f"{k:08d}_000.png" for k in range(20)]
    labels = [["Mass"]] * 6 + [["No Finding"]] * 8 + [["Mass"]] * 3 + [["No Finding"]] * 3
    split = ["train"] * 14 + ["test"] * 6
    index = pd.DataFrame({"image_id": ids, "patient_id": [f"p{k}" for k in range(20)], "labels": labels,
                          "view": "PA", "split": split, "original_width": 1024, "original_height": 1024})
    cache = FakeCache(tmp_path, index, side)
    cache.images = _images(20, side)
    csv = tmp_path / "BBox_List_2017.csv"
    csv.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                   + "".join(f"{i},Mass,512,128,256,256,,,\n" for i in ids[14:17]))
    truth = GroundTruth(cache, boxes_csv=csv)
    torch.manual_seed(0)
    entry = BackboneEntry("random-resnet18", Backbone("resnet18"))
    result = localise([entry], cache, ["Mass"], truth, GradcamConfig(input_size=64, batch_size=8))
    assert list(result.scores["image_id"]) == ids[14:17] and result.ground_truth == "BBox_List_2017.csv boxes"
    example = result.examples["Mass"]
    expected = boxes_to_mask([(0.5, 0.125, 0.75, 0.375)], side)
    assert (example["mask"] == expected).all()
    first = result.scores.iloc[0]
    assert first["energy"] == pytest.approx(energy_inside(example["maps"]["random-resnet18"], expected))
    assert bool(first["hit"]) == pointing_hit(example["maps"]["random-resnet18"], expected)
    summary = result.summary.iloc[0]
    assert summary["images"] == 3 and summary["hit_rate"] == pytest.approx(result.scores["hit"].mean())


def test_imagenet_appears_only_with_a_local_weights_file(tmp_path):
    import torchvision

    from cxrtune.analysis.localise import sweep_backbones

    params = {"model.arch": "resnet18", "train.seed": 0}
    entries = sweep_backbones(tmp_path, None, params)
    assert [e.label for e in entries] == [tmp_path.name, "imagenet-resnet18", "random-resnet18"]
    assert entries[0].backbone is None and entries[1].backbone is None and "--imagenet-weights" in entries[1].note
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    entries = sweep_backbones(tmp_path, None, params, imagenet_weights=weights)
    assert entries[1].backbone is not None and entries[1].backbone.arch == "resnet18"
