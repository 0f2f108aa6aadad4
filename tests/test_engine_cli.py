"""``cxrtune pretrain`` end to end on a tiny phantom cache, and its config overrides."""

from __future__ import annotations

import json

import pytest
import torch

from cxrtune.cli import main
from cxrtune.engine.checkpoint import list_checkpoints
from cxrtune.models.backbone import load_backbone


def test_print_config_applies_profile_and_overrides(capsys):
    assert main(["pretrain", "--method", "moco", "--profile", "cpu", "--out", "unused", "--epochs", "7",
                 "--set", "moco.variance_weight=0", "--print-config"]) == 0
    flat = json.loads(capsys.readouterr().out)
    assert flat["train.epochs"] == 7 and flat["moco.variance_weight"] == 0 and flat["train.image_size"] == 64
    assert flat["model.arch"] == "resnet18"


def test_unknown_key_is_a_clear_error(capsys):
    assert main(["pretrain", "--method", "moco", "--out", "unused", "--set", "moco.nope=1", "--print-config"]) == 2
    assert "moco.nope" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_on_phantom_writes_checkpoints_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("cxrtune.data.sources.phantom")
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["pretrain", "--method", "moco", "--profile", "smoke", "--source", "phantom", "--size", "40",
            "-o", "n_pretrain=32", "-o", "train_pos=2", "-o", "val_pos=2", "-o", "train_neg=4", "-o", "val_neg=4",
            "--epochs", "1", "--threads", "1", "--quiet", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["epoch"] == 1
    [(epoch, path)] = list_checkpoints(out)
    assert epoch == 1 and load_backbone(path).arch == "resnet18"
