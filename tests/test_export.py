"""Export of the best checkpoint: selection, torchvision compatibility, no silent overwrite."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from _sweep_fixtures import write_tune_trial
from cxrtune.errors import CxrtuneError
from cxrtune.export import export_best, register_in_mlflow
from cxrtune.models.backbone import build_backbone


@pytest.fixture
def sweep(tmp_path):
    folder = tmp_path / "runs" / "moco_variance"
    write_tune_trial(folder, "aaa", [0.55, 0.61], seed=1)
    write_tune_trial(folder, "bbb", [0.58, 0.66, 0.63], seed=2)  # best report: iteration 2 of bbb
    return folder


def test_best_checkpoint_exports_and_loads_into_torchvision_strictly(sweep):
    out = export_best(sweep, "probe_auroc_20shot")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trial_id"] == "bbb" and metrics["selected_by"]["value"] == 0.66
    assert metrics["checkpoint"].endswith("checkpoint_000002")
    assert json.loads((out / "config.json").read_text())["method"] == "moco"
    assert "probe_auroc_20shot" in (out / "MODEL_CARD.md").read_text()

    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(out / "backbone.pt", weights_only=True), strict=True)
    model.eval()
    ours = build_backbone("resnet18", seed=202).eval()  # the selected checkpoint's weights
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(grey.repeat(1, 3, 1, 1)), ours(grey), atol=1e-4)


def test_export_refuses_to_overwrite_without_force(sweep):
    export_best(sweep, "probe_auroc_20shot")
    with pytest.raises(CxrtuneError, match="already exists; pass --force"):
        export_best(sweep, "probe_auroc_20shot")
    export_best(sweep, "probe_auroc_20shot", mode="min", force=True)
    assert json.loads((sweep / "export" / "metrics.json").read_text())["selected_by"]["value"] == 0.55


def test_unknown_metric_and_missing_sweep_are_clear_errors(sweep, tmp_path):
    with pytest.raises(CxrtuneError, match="no checkpoint .* has a reported 'finetune_auroc_5shot'.*probe_auroc_20shot"):
        export_best(sweep, "finetune_auroc_5shot")
    with pytest.raises(CxrtuneError, match="sweep folder .*nothing does not exist"):
        export_best(tmp_path / "nothing", "probe_auroc_20shot")
    assert not (sweep / "export").exists()


def test_registering_sets_the_best_alias(sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = export_best(sweep, "probe_auroc_20shot")
    version = register_in_mlflow(out, "cxr-moco", tracking_uri=uri)
    assert str(MlflowClient(uri).get_model_version_by_alias("cxr-moco", "best").version) == version


def test_an_export_loads_back_as_a_cxrtune_backbone_with_the_same_features(sweep):
    from cxrtune.models.backbone import load_backbone

    out = export_best(sweep, "probe_auroc_20shot")
    back = load_backbone(out / "backbone.pt", arch="resnet18").eval()
    assert back.in_chans == 3
    ours = build_backbone("resnet18", seed=202).eval()
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(back(grey), ours(grey), atol=1e-4)  # grey is replicated to RGB
