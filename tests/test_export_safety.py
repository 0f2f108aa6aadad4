"""``cxrtune export --force`` replaces only an earlier export, and never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import cxrtune.export as export_module
from cxrtune.cli import main
from _sweep_fixtures import write_tune_trial
from cxrtune.errors import CxrtuneError
from cxrtune.export import EXPORT_FILES, MARKER_FILE, export_best

METRIC = "probe_auroc_20shot"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """runs/moco_variance: trial aaa (0.55), trial bbb (0.66, the best), plus an optuna.db."""
    runs = tmp_path_factory.mktemp("runs")
    sweep = runs / "moco_variance"
    write_tune_trial(sweep, "aaa", [0.55], seed=1)
    write_tune_trial(sweep, "bbb", [0.66], seed=2)
    (sweep / "optuna.db").write_bytes(b"SQLite format 3\0")
    return runs


def _export(storage: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--sweep", "moco_variance", "--storage", str(storage), "--out", str(out), *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_every_export_has_a_marker_naming_its_source(storage, tmp_path, capsys):
    out = tmp_path / "best"
    assert main(_export(storage, out)) == 0
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["format"] == "cxrtune-export" and marker["version"] == 1
    assert marker["trial_id"] == "bbb" and marker["metric"] == METRIC and marker["value"] == 0.66
    assert marker["sweep_folder"] == str((storage / "moco_variance").resolve())
    assert marker["checkpoint"].endswith("pretrain_bbb/checkpoint_000001") and marker["created"]
    assert {p.name for p in out.iterdir()} == EXPORT_FILES | {MARKER_FILE}


def test_force_onto_a_user_folder_is_refused_and_its_files_stay(storage, tmp_path, capsys):
    user = tmp_path / "thesis"
    (user / "figures").mkdir(parents=True)
    (user / "draft.tex").write_text("\\section{Results}")
    (user / "figures" / "roc.png").write_bytes(b"\x89PNG")
    before = _snapshot(user)
    assert main(_export(storage, user, "--force")) == 2
    err = capsys.readouterr().err
    assert f"export folder {user} is not empty and is not a cxrtune export" in err
    assert "draft.tex" in err and MARKER_FILE in err and "--force replaces only an earlier export" in err
    assert _snapshot(user) == before and not _leftovers(tmp_path, "thesis")


def test_force_onto_a_sweep_folder_is_refused_as_a_sweep(storage, tmp_path, capsys):
    other = storage / "other_sweep"
    write_tune_trial(other, "ccc", [0.5], seed=3)
    (other / "experiment_state-2024-01-01_00-00-00.json").write_text("{}")
    (other / "optuna.db").write_bytes(b"SQLite format 3\0")
    before = _snapshot(other)
    assert main(_export(storage, other, "--force")) == 2
    err = capsys.readouterr().err
    assert f"export folder {other} is not empty and is not a cxrtune export" in err
    assert "looks like a sweep folder" in err and "optuna.db" in err and "pretrain_ccc" in err
    assert _snapshot(other) == before


@pytest.mark.parametrize("target", ["sweep", "storage"])
def test_the_sweep_folder_or_a_folder_holding_it_is_never_an_export_target(storage, target, capsys):
    out = storage / "moco_variance" if target == "sweep" else storage
    before = _snapshot(storage / "moco_variance")
    assert main(_export(storage, out, "--force")) == 2
    assert "would replace the sweep" in capsys.readouterr().err
    assert _snapshot(storage / "moco_variance") == before


def test_force_replaces_an_earlier_export_and_updates_its_marker(storage, tmp_path, capsys):
    out = tmp_path / "best"
    assert main(_export(storage, out)) == 0
    old_backbone = (out / "backbone.pt").read_bytes()
    assert main(_export(storage, out)) == 2  # no --force: refused, as before
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(_export(storage, out, "--force", "--mode", "min")) == 0
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["trial_id"] == "aaa" and marker["mode"] == "min" and marker["value"] == 0.55
    assert json.loads((out / "metrics.json").read_text())["trial_id"] == "aaa"
    assert (out / "backbone.pt").read_bytes() != old_backbone
    assert not _leftovers(tmp_path, "best")


def test_an_export_from_before_the_marker_is_replaced_by_the_sweep_driver_call(storage, tmp_path):
    """The sweep driver calls export_best(folder, objective, "max", force=True) into <sweep>/export."""
    sweep = tmp_path / "copy"
    write_tune_trial(sweep, "ddd", [0.7], seed=4)
    out = export_best(sweep, METRIC)
    (out / MARKER_FILE).unlink()  # what an older cxrtune left there
    out = export_best(sweep, METRIC, "max", force=True)
    assert out == sweep / "export" and json.loads((out / MARKER_FILE).read_text())["trial_id"] == "ddd"
    # the same four names with a foreign metrics.json are not taken for an old export
    (out / MARKER_FILE).unlink()
    (out / "metrics.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(CxrtuneError, match="is not a cxrtune export"):
        export_best(sweep, METRIC, "max", force=True)


def _fail_torch_save(monkeypatch, out):
    def boom(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", boom)


def _fail_model_card(monkeypatch, out):
    def boom(*args, **kwargs):
        raise RuntimeError("model card failed")
    monkeypatch.setattr(export_module, "model_card", boom)


def _fail_rename_into_place(monkeypatch, out):
    """The first rename onto ``out`` (the new export moving in) fails; a later one (a rollback) works."""
    real, calls = os.rename, []

    def rename(src, dst):
        if Path(dst) == out and not calls:
            calls.append(src)
            raise OSError("rename failed")
        return real(src, dst)
    monkeypatch.setattr(os, "rename", rename)  # Path.rename goes through os.rename too


@pytest.mark.parametrize("inject", [_fail_torch_save, _fail_model_card, _fail_rename_into_place],
                         ids=["torch.save", "model_card", "rename-into-place"])
def test_a_failure_mid_export_leaves_the_old_export_byte_identical(storage, tmp_path, monkeypatch, inject):
    out = tmp_path / "best"
    export_best(storage / "moco_variance", METRIC, out=out)
    before = _snapshot(out)
    inject(monkeypatch, out)
    with pytest.raises((OSError, RuntimeError)):
        export_best(storage / "moco_variance", METRIC, "min", out=out, force=True)
    assert _snapshot(out) == before
    assert not _leftovers(tmp_path, "best")
