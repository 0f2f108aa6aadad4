"""`cxrtune data index|cache|tasks|info|preview` on real on-disk layouts, as a user types them."""

from __future__ import annotations

from pathlib import Path

import pytest

from _fixtures_layouts import write_nih_layout
from _phantom_fixtures import phantom_env
from cxrtune.cli import main
from cxrtune.data.tasks import load_episodes


@pytest.fixture
def nih(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    return write_nih_layout(tmp_path / "nih", n_patients=30, images_per_patient=3, kaggle=True)


def test_index_cache_tasks_info_on_an_nih_folder(nih, tmp_path, capsys):
    root = str(nih["root"])
    assert main(["data", "index", "--source", "nih", "--root", root, "--out", str(tmp_path / "idx.parquet")]) == 0
    out = capsys.readouterr().out
    assert "images: 90   patients: 30" in out and (tmp_path / "idx.parquet").is_file()

    assert main(["data", "cache", "--source", "nih", "--root", root, "--size", "32", "--quiet"]) == 0
    first = capsys.readouterr().out
    assert "90" in first

    episodes = tmp_path / "episodes.parquet"
    assert main(["data", "tasks", "--source", "nih", "--root", root, "--size", "32", "--quiet",
                 "--shots", "1,2", "--trials", "2", "--pool-option", "min_train=2", "--pool-option", "min_val=1",
                 "--out", str(episodes)]) == 0
    table = load_episodes(episodes)
    assert set(table["disease"]) == {"Hernia", "Effusion"}  # "No Finding" is only ever a negative
    assert len(table) == 2 * 2 * 2 and set(table["trial"]) == {0, 1}

    assert main(["data", "info", "--source", "nih", "--root", root]) == 0
    info = capsys.readouterr().out
    assert "images: 90" in info and "caches:" in info


def test_a_corrupt_png_is_skipped_and_listed_or_fails_in_strict_mode(nih, capsys):
    victim = next(iter(nih["images"].values()))
    victim.write_bytes(victim.read_bytes()[:50])
    root = str(nih["root"])
    assert main(["data", "cache", "--source", "nih", "--root", root, "--size", "32", "--quiet", "--strict"]) == 2
    err = capsys.readouterr().err
    assert victim.name in err
    assert main(["data", "cache", "--source", "nih", "--root", root, "--size", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "89 cached of 90 indexed, 1 skipped" in out
    from cxrtune.data.cache import ImageCache, find_caches

    report = ImageCache.open(find_caches("nih")[0]).report
    assert [Path(s["path"]).name for s in report["skipped"]] == [victim.name]


def test_errors_name_the_input(tmp_path, capsys):
    assert main(["data", "index", "--source", "nih", "--root", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["data", "index", "--source", "mimic", "--root", str(tmp_path)]) == 2
    assert "'mimic' is not known: use one of" in capsys.readouterr().err


def test_preview_writes_a_contact_sheet(tmp_path, monkeypatch, capsys):
    phantom_env(monkeypatch, tmp_path)
    out = tmp_path / "sheet.png"
    assert main(["data", "preview", "--out", str(out), "--size", "64"]) == 0
    from PIL import Image

    with Image.open(out) as image:
        assert image.size[0] >= 4 * 64 and image.size[1] >= 2 * 64
