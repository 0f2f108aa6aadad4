"""The training loop: exact resume, checkpoints readable as backbones, divergence, stop, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrtune.engine import DivergenceError, PretrainConfig, pretrain, read_metrics
from cxrtune.methods import method_names
from cxrtune.profiles import smoke
from cxrtune.engine.checkpoint import list_checkpoints, load_checkpoint
from cxrtune.errors import CxrtuneError, DataError
from cxrtune.models.backbone import CheckpointError, load_backbone
from tests._engine_fixtures import blob_images

METRIC_KEYS = {"epoch", "ssl_loss", "feature_std", "effective_rank", "mean_cosine", "images_per_s", "lr", "seconds"}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch, tmp_path):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(method: str, epochs: int = 4) -> PretrainConfig:
    # One step per epoch on 8 images keeps four methods x 8 epochs within seconds.
    return smoke(method).override({"train.epochs": epochs, "train.checkpoint_every": 2, "train.keep_checkpoints": 5,
                                   "train.monitor_images": 8, "train.batch_size": 8})


@pytest.mark.parametrize("method", method_names())
def test_four_epochs_straight_equal_two_plus_resume_plus_two(method, tmp_path):
    images = blob_images(8, 40)
    straight = pretrain(_tiny(method), images, tmp_path / "straight")
    stopped = pretrain(_tiny(method), images, tmp_path / "resumed", callback=lambda m: "stop" if m["epoch"] == 2 else None)
    assert stopped.status == "stopped" and stopped.epochs_completed == 2
    resumed = pretrain(_tiny(method), images, tmp_path / "resumed")
    assert resumed.epochs_completed == 4 and [m["epoch"] for m in resumed.metrics] == [3, 4]
    a = load_checkpoint(straight.checkpoint)
    b = load_checkpoint(resumed.checkpoint)
    for key in a["backbone"]:
        assert torch.equal(a["backbone"][key], b["backbone"][key]), key
    for key in a["method_state"]:  # heads, queue, EMA teacher, DINO centre
        assert torch.equal(a["method_state"][key], b["method_state"][key]), key
    # The metrics file holds each epoch once, and the resumed epochs match the straight run's losses.
    lines = read_metrics(tmp_path / "resumed")
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert [m["ssl_loss"] for m in lines] == [m["ssl_loss"] for m in read_metrics(tmp_path / "straight")]


def test_checkpoint_is_a_backbone_file_and_keeps_the_last_k(tmp_path):
    images = blob_images(16, 40)
    config = smoke("moco").override({"train.epochs": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": 2})
    seen = []
    result = pretrain(config, images, tmp_path / "run", callback=seen.append)
    assert [e for e, _ in list_checkpoints(tmp_path / "run")] == [2, 3]
    assert len(seen) == 3 and METRIC_KEYS <= set(seen[0])
    assert [Path(m["checkpoint"]).name for m in seen] == ["epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt"]
    backbone = load_backbone(result.checkpoint, arch="resnet18")
    for key, value in backbone.torchvision_state_dict().items():
        assert torch.equal(value, result.backbone.torchvision_state_dict()[key])
    payload = torch.load(result.checkpoint, weights_only=True)
    assert payload["method"] == "moco" and payload["config"]["moco.queue_size"] == 64
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method"] == "moco"
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp*"))


def test_resume_with_a_different_config_is_refused(tmp_path):
    images = blob_images(16, 40)
    pretrain(smoke("moco").override({"train.epochs": 1}), images, tmp_path / "run")
    with pytest.raises(CheckpointError, match="optim.lr"):
        pretrain(smoke("moco").override({"train.epochs": 2, "optim.lr": 0.5}), images, tmp_path / "run")


def test_nan_loss_raises_divergence_error(tmp_path):
    images = blob_images(16, 40)
    config = smoke("barlow").override({"optim.lr": 1e12, "optim.warmup_epochs": 0, "train.epochs": 3})
    with pytest.raises(DivergenceError) as info:
        pretrain(config, images, tmp_path / "run")
    assert isinstance(info.value, CxrtuneError) and info.value.step is not None
    assert not isinstance(info.value, (DataError, RuntimeError))


def test_bad_images_are_refused(tmp_path):
    with pytest.raises(DataError, match="uint8"):
        pretrain(smoke("moco"), np.zeros((16, 40, 40), dtype=np.float32), tmp_path)
    with pytest.raises(DataError, match="batch"):
        pretrain(smoke("moco"), blob_images(4, 40), tmp_path)
    with pytest.raises(DataError, match="rows"):
        pretrain(smoke("moco"), blob_images(16, 40), tmp_path, rows=[0, 99])


def test_time_limit_stops_with_a_checkpoint_and_a_finished_run_is_not_redone(tmp_path):
    images = blob_images(8, 40)
    config = smoke("spark").override({"train.epochs": 3, "train.checkpoint_every": 10, "train.monitor_images": 8, "train.batch_size": 8,
                                      "train.time_limit_minutes": 1e-6})
    first = pretrain(config, images, tmp_path / "run")
    assert first.status == "time_limit" and first.epochs_completed == 1 and first.checkpoint.name == "epoch-0001.pt"
    rest = pretrain(config.override({"train.time_limit_minutes": 0.0}), images, tmp_path / "run")
    assert rest.status == "completed" and [m["epoch"] for m in rest.metrics] == [2, 3]
    again = pretrain(config, images, tmp_path / "run")
    assert again.epochs_completed == 3 and again.metrics == []
