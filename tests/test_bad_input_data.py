"""Everyday accidents in the data layer, as a user meets them on the command line.

Each row of the table is what a user types (``cxrtune data ...`` on a real CSV archive of PNGs),
the exit code and a fragment of what they must read: a bad value is refused with exit code 2 and
a message naming the flag, the value and what would be valid, never a traceback or a silent
default.
"""

from __future__ import annotations

import csv
import os

import pytest

from _fixtures_layouts import PNG_KINDS, write_nih_layout, write_png
from cxrtune.cli import main
from cxrtune.data.sources.base import make_source
from cxrtune.data.tasks import load_episodes

#: (labels cell, training images, validation images) of the mixed archive.
MIXED = [("Hernia", 3, 2), ("Mass", 3, 2), ("NaN", 3, 2), ("", 3, 2), ("No Finding", 3, 2)]
ONLY_NO_FINDING = [("NaN", 2, 1), ("", 2, 1), ("No Finding", 2, 1)]
POOL = ["--pool-option", "min_train=2", "--pool-option", "min_val=1"]


def write_archive(root, plan) -> None:
    """``root/labels.csv`` with a split column and one small PNG per row under ``root/scans/``."""
    root.mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels", "patient_id", "split"])
        i = 0
        for cell, n_train, n_val in plan:
            for split in ["train"] * n_train + ["val"] * n_val:
                write_png(root / f"scans/img{i:03d}.png", PNG_KINDS[i % len(PNG_KINDS)], 16, 20, seed=i)
                writer.writerow([f"scans/img{i:03d}.png", cell, f"P{i:03d}", split])
                i += 1


@pytest.fixture
def places(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    write_archive(tmp_path / "mixed", MIXED)
    write_archive(tmp_path / "normal", ONLY_NO_FINDING)
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    return {"root": tmp_path / "mixed", "normal": tmp_path / "normal", "loop": tmp_path / "loop-a",
            "out": tmp_path / "episodes.parquet"}


TASKS = ["data", "tasks", "--source", "csv", "--root", "{root}", "--quiet", "--size", "16", "--out", "{out}"]
CACHE = ["data", "cache", "--source", "csv", "--root", "{root}", "--quiet"]
SHOTS_VALID = "use positive integers separated by commas, e.g. --shots 1,5,10"

CASES = [
    # --shots
    (TASKS + ["--shots", "5,abc"], 2, f"--shots '5,abc' is not valid: 'abc' is not a positive integer; {SHOTS_VALID}"),
    (TASKS + ["--shots", "0"], 2, f"--shots '0' is not valid: '0' is not a positive integer; {SHOTS_VALID}"),
    (TASKS + ["--shots=-3,5"], 2, "--shots '-3,5' is not valid: '-3' is not a positive integer"),
    (TASKS + ["--shots", "1.5"], 2, "--shots '1.5' is not valid: '1.5' is not a positive integer"),
    (TASKS + ["--shots", "5,,10"], 2, f"--shots '5,,10' is not valid: an empty entry; {SHOTS_VALID}"),
    (TASKS + ["--shots", "5,5"], 2, "--shots '5,5' is not valid: 5 is listed twice"),
    # other numbers of `data tasks`: 0 and negatives are refused, never replaced by a default
    (TASKS + ["--trials", "0"], 2, "--trials 0 is not valid: use an integer >= 1"),
    (TASKS + ["--seed-base", "-1"], 2, "--seed-base -1 is not valid: use an integer >= 0"),
    (TASKS + ["--size", "0"], 2, "--size 0 is not valid: use an integer from 8 to 4096"),
    (TASKS + ["--workers", "0"], 2, "--workers 0 is not valid: use an integer >= 1"),
    (TASKS + ["--diseases", ","], 2, "--diseases ',' names no disease: use comma-separated labels"),
    (TASKS + ["--pool-option", "min_trian=2"], 2,
     "--pool-option min_trian is not a task pool option of the csv source: use one of diseases, eval_splits"),
    (TASKS + ["--pool-option", "min_train"], 2, "--pool-option 'min_train' is not of the form key=value"),
    (TASKS + ["--pool-option", "min_train=0"], 2, "task pool option min_train = 0 is not valid: use an integer >= 1"),
    (TASKS + ["--pool-option", "max_train_neg=-1"], 2,
     "task pool option max_train_neg = -1 is not valid: use an integer >= 1 or None (no cap)"),
    # `data cache` and `data preview`
    (CACHE + ["--size", "5000"], 2, "--size 5000 is not valid: use an integer from 8 to 4096"),
    (CACHE + ["--workers", "-2"], 2, "--workers -2 is not valid: use an integer >= 1"),
    (["data", "preview", "--size", "0", "--out", "{out}"], 2, "--size 0 is not valid: use an integer from 8 to 4096"),
    (["data", "preview", "--seed", "-1", "--out", "{out}"], 2, "--seed -1 is not valid: use an integer >= 0"),
    # a root that is a symbolic link loop
    (["data", "index", "--source", "csv", "--root", "{loop}"], 2, "loop-a is a symbolic link loop"),
    # no-finding labels are never tasks: NaN, empty and No Finding alone give no task at all ...
    (TASKS + ["--root", "{normal}"] + POOL, 2,
     "few-shot tasks need images with exactly one label other than the no-finding labels"),
    # ... too high minimums are named ...
    (TASKS + ["--pool-option", "min_train=50"], 2, "no label of the csv source qualifies as a few-shot task"),
    # ... and the mixed archive has two diseases, not five
    (TASKS + ["--shots", "1,2", "--trials", "1"] + POOL, 0, "4 episodes (2 diseases x 2 shot counts x 1 trials)"),
]


def _case_id(argv: list[str]) -> str:
    base = TASKS if argv[:2] == TASKS[:2] else CACHE if argv[:2] == CACHE[:2] else argv[:2]
    return " ".join(argv[1:2] + [a for a in argv[len(base):] if a != "{out}"])


@pytest.mark.parametrize("argv, code, message", CASES, ids=[_case_id(c[0]) for c in CASES])
def test_the_data_commands_refuse_bad_input_by_name(places, capsys, argv, code, message):
    argv = [a.format(**places) for a in argv]
    assert main(argv) == code
    out, err = capsys.readouterr()
    shown = err if code else out
    assert message in shown, shown
    if code:
        assert err.startswith("cxrtune: error: ") and "Traceback" not in err


def test_no_finding_images_serve_as_negatives_in_the_episodes(places, capsys):
    argv = [a.format(**places) for a in TASKS + ["--shots", "3", "--trials", "4"] + POOL]
    assert main(argv) == 0
    episodes = load_episodes(places["out"])
    assert set(episodes["disease"]) == {"Hernia", "Mass"}
    cache_index = make_source("csv", places["root"]).build_index().set_index("image_id")
    negatives = {i for row in episodes.itertuples() for i, y in zip(row.train_ids, row.train_labels) if y == 0}
    drawn = {label for i in negatives for label in (cache_index.loc[i, "labels"] or ["(empty)"])}
    assert {"NaN", "No Finding", "(empty)"} & drawn  # no-finding images are drawn as negatives
    summary = capsys.readouterr().out
    # train_neg of Hernia: 3 Mass + 9 no-finding training images; val_neg: 2 Mass + 6 no-finding
    assert "Hernia          3        2         12        8" in summary


def test_a_flat_image_is_cached_with_a_warning_on_the_command_line(places, capsys):
    write_png(places["root"] / "scans/img000.png", "grey8", 1, 1)  # overwrite with a 1 x 1 PNG
    assert main([a.format(**places) for a in CACHE + ["--size", "16"]]) == 0
    out, err = capsys.readouterr()
    assert "warning: 1 cached image(s) have every pixel equal" in err and "img000.png" in err
    assert "25 cached of 25 indexed" in out and "flagged  1 image(s)" in out


def test_empty_and_nan_labels_of_an_nih_folder_are_negatives_too(tmp_path):
    layout = write_nih_layout(tmp_path / "nih", n_patients=40, images_per_patient=1, official_lists=False,
                              labels=("Hernia", "", "No Finding", "NaN", "Mass"))
    source = make_source("nih", layout["root"])
    index = source.build_index()
    pool = source.task_pool(index, min_train=2, min_val=1)
    assert pool.diseases == ["Hernia", "Mass"]
    unlabelled = set(index.loc[index["labels"].map(len) == 0, "image_id"])
    assert len(unlabelled) == 16  # "" and NaN
    train = set(index.loc[index["split"] == "train", "image_id"])
    assert unlabelled & train <= set(pool.tasks["Hernia"].train_neg)
