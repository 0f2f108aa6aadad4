"""``cxrtune pretrain`` end to end on a tiny phantom cache, and its config overrides."""

from __future__ import annotations

import json

import pytest
import torch

from _print_config import parse_config_table
from cxrtune.cli import main
from cxrtune.engine.checkpoint import list_checkpoints
from cxrtune.models.backbone import load_backbone


def test_print_config_applies_profile_and_overrides_and_names_where_each_value_comes_from(capsys):
    assert main(["pretrain", "--method", "moco", "--profile", "cpu", "--out", "unused", "--epochs", "7",
                 "--set", "moco.variance_weight=0", "--print-config"]) == 0
    rows = parse_config_table(capsys.readouterr().out)
    assert rows["train.epochs"] == ("7", "--set") and rows["moco.variance_weight"] == ("0", "--set")
    assert rows["train.image_size"] == ("64", "profile cpu: scale")
    assert rows["model.arch"] == ("'resnet18'", "profile cpu: scale")
    assert rows["moco.temperature"] == ("0.2", "method moco: cpu preset")
    assert rows["optim.momentum"] == ("0.9", "default")
    assert rows["train.time_limit_minutes"] == ("56.0", "profile cpu: budget")
    # a MoCo run holds MoCo's block only, and cxrtune pretrain has no probe, health or trial keys
    assert not [k for k in rows if k.split(".")[0] in ("dino", "barlow", "spark", "probe", "health", "trial")]


def test_pretrain_and_a_sweep_trial_of_one_profile_train_the_same_config(capsys):
    from cxrtune.sweep.cli import resolve

    from _sweep_fixtures import load_sweep_script

    assert main(["pretrain", "--method", "moco", "--profile", "cpu", "--out", "unused", "--print-config"]) == 0
    pretrain_rows = parse_config_table(capsys.readouterr().out)
    trial = resolve(load_sweep_script("moco_variance"), "cpu", {}).flat
    assert {k: v for k, (v, _) in pretrain_rows.items() if k != "method"} == \
        {k: repr(trial[k]) for k in pretrain_rows if k != "method"}


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


def test_smoke_profile_on_phantom_defaults_to_the_small_phantom_and_o_overrides_it():
    from cxrtune.cli import build_parser
    from cxrtune.engine.cli import source_options
    from cxrtune.profiles import SMOKE_PHANTOM

    def options(*argv):
        return source_options(build_parser().parse_args(["pretrain", "--method", "moco", "--out", "x", *argv]))

    assert options("--profile", "smoke") == SMOKE_PHANTOM
    assert options("--profile", "smoke", "-o", "n_pretrain=48") == {**SMOKE_PHANTOM, "n_pretrain": 48}
    assert options("--profile", "cpu") == {}  # the cpu profile reads the full phantom
    assert options("--profile", "smoke", "--source", "nih", "-o", "allow_missing=true") == {"allow_missing": True}
    # the sweeps' phantom of each profile, so that both build and share one cache
    from cxrtune.profiles import PROFILES

    assert options("--profile", "default") == dict(PROFILES["default"].phantom) != {}


@pytest.mark.slow
def test_smoke_profile_trains_on_a_small_phantom_cache_at_32_px(tmp_path, monkeypatch, capsys):
    """The cache is the sweeps' smoke phantom (hundreds of images, not 13,900), with -o on top (kept small here)."""
    pytest.importorskip("cxrtune.data.sources.phantom")
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:
        assert main(["pretrain", "--method", "moco", "--profile", "smoke", "-o", "n_pretrain=48", "-o", "train_neg=8",
                     "-o", "val_neg=8", "--epochs", "1", "--quiet", "--out", str(tmp_path / "run")]) == 0
        assert torch.get_num_threads() == 1  # smoke runs on one thread unless --threads says otherwise
    finally:
        torch.set_num_threads(threads)
    [cache_json] = (tmp_path / "cache").glob("phantom/*-s32-crop/cache.json")
    built = json.loads(cache_json.read_text())
    assert built["size"] == 32 and built["source"]["n_pretrain"] == 48 and built["source"]["val_neg"] == 8
    assert built["source"]["train_pos"] == 20 and built["source"]["studies_per_patient"] == 4
    assert built["n"] < 1000
    assert f"on {built['n']} phantom images" in capsys.readouterr().out
    [(epoch, _)] = list_checkpoints(tmp_path / "run")
    assert epoch == 1
