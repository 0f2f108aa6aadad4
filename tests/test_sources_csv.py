"""The generic CSV source: a user's own archive, and CheXpert's real one-hot listing."""

from __future__ import annotations

import collections
import csv
import gzip
import os
import re

import numpy as np
import pytest

from _fixtures_layouts import (
    PNG_KINDS, centre_square, expected_grey_uint8, structured_array, write_csv_layout, write_png,
)
from _real_metadata import real_metadata_dir  # noqa: F401
from cxrtune.data.cache import build_cache
from cxrtune.data.index import patient_split
from cxrtune.data.sources.base import make_source
from cxrtune.data.sources.csv import CHEXPERT_LABELS, CsvSource
from cxrtune.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))


def test_minimal_csv(tmp_path):
    layout = write_csv_layout(tmp_path / "archive", n_images=8)
    source = make_source("csv", layout["root"])
    index = source.build_index()
    assert list(index["image_id"]) == list(layout["labels"])  # the path as written
    for row in index.itertuples():
        assert row.labels == layout["labels"][row.image_id]
        assert row.path == str(layout["images"][row.image_id])
        assert row.view == "PA"
        assert row.split == patient_split(row.patient_id)
    assert list(index["patient_id"]) == [f"P{i // 2}" for i in range(8)]
    assert source.report["missing"] == 0 and source.report["indexed"] == 8


def test_optional_columns_are_used(tmp_path):
    layout = write_csv_layout(tmp_path / "archive", n_images=6,
                              header=("image_id", "path", "labels", "patient_id", "view", "split", "site"))
    index = CsvSource(layout["root"]).build_index()
    assert list(index["image_id"]) == [f"img{i}" for i in range(6)]
    assert list(index["view"]) == ["PA", "AP"] * 3
    assert list(index["split"]) == ["train", "train", "val", "val", "test", "test"]
    assert "site" in index.columns  # extra columns are kept


def test_root_may_be_the_csv_and_paths_resolve_against_its_folder(tmp_path):
    layout = write_csv_layout(tmp_path / "archive", n_images=4)
    index = CsvSource(layout["csv"]).build_index()
    assert list(index["path"]) == [str(p) for p in layout["images"].values()]
    moved = tmp_path / "elsewhere.csv"
    moved.write_text(layout["csv"].read_text())
    index = CsvSource(csv=str(moved), image_root=str(layout["root"])).build_index()
    assert list(index["path"]) == [str(p) for p in layout["images"].values()]
    with pytest.raises(DataError, match="4 of 4 listed images are missing on disk"):
        CsvSource(csv=str(moved)).build_index()  # relative to the CSV's folder: nothing there


def test_label_separator_option(tmp_path):
    layout = write_csv_layout(tmp_path / "archive", n_images=4, sep=";")
    index = CsvSource(layout["root"], label_sep=";").build_index()
    assert list(index["labels"]) == list(layout["labels"].values())


def test_every_png_kind_decodes_by_the_study_rule(tmp_path):
    layout = write_csv_layout(tmp_path / "archive", n_images=4)
    source = CsvSource(layout["root"])
    images = source.read_images(source.build_index(), size=48)
    for i, image in enumerate(images):
        expected = centre_square(expected_grey_uint8(structured_array(PNG_KINDS[i], 48, 64, seed=i)))
        np.testing.assert_array_equal(image, expected, err_msg=PNG_KINDS[i])


def test_bad_input_gets_specific_errors(tmp_path):
    with pytest.raises(DataError, match="root .*nowhere does not exist"):
        CsvSource(tmp_path / "nowhere").build_index()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="label CSV .*labels.csv does not exist"):
        CsvSource(tmp_path / "empty").build_index()

    layout = write_csv_layout(tmp_path / "wrong", n_images=2, header=("file", "labels", "patient"))
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['path', 'patient_id'\]; expected a header with "
                                        r"\['path', 'labels', 'patient_id'\] but found \['file', 'labels', 'patient'\]"):
        CsvSource(layout["root"]).build_index()

    layout = write_csv_layout(tmp_path / "gone", n_images=4)
    layout["images"]["scans/s1/img3.png"].unlink()
    with pytest.raises(DataError, match=r"1 of 4 listed images are missing on disk \(e.g. .*img3.png"):
        CsvSource(layout["root"]).build_index()
    assert len(CsvSource(layout["root"], allow_missing=True).build_index()) == 3

    layout = write_csv_layout(tmp_path / "split", n_images=2, header=("path", "labels", "patient_id", "split"))
    layout["csv"].write_text(layout["csv"].read_text().replace(",train", ",training"))
    with pytest.raises(DataError, match=r"split value\(s\) \['training'\] are not valid: use train, val, test"):
        CsvSource(layout["root"]).build_index()

    layout = write_csv_layout(tmp_path / "nopatient", n_images=2)
    layout["csv"].write_text(layout["csv"].read_text().replace(",P0", ","))
    with pytest.raises(DataError, match=r"column 'patient_id' is empty in row 1"):
        CsvSource(layout["root"]).build_index()

    layout["csv"].write_text("")
    with pytest.raises(DataError, match="labels.csv could not be read as CSV"):
        CsvSource(layout["root"]).build_index()
    layout["csv"].write_text('path,labels,patient_id\n"scans/a.png,A,P1\n')  # unbalanced quote
    with pytest.raises(DataError, match="(could not be read as CSV|lacks the column)"):
        CsvSource(layout["root"]).build_index()

    with pytest.raises(ConfigError, match="uncertain_as = 'maybe' is not allowed"):
        CsvSource(layout["root"], uncertain_as="maybe")
    with pytest.raises(DataError, match="patient_pattern = '\\(' is not a valid regular expression"):
        CsvSource(layout["root"], patient_pattern="(")


def _write_labelled_csv(root, plan):
    """``root/labels.csv`` (path, labels, patient_id, split) and a 16 x 20 PNG per row under
    ``root/scans/``; ``plan`` is [(labels cell, n train, n val)]. Returns {labels cell: [ids]}."""
    root.mkdir(parents=True, exist_ok=True)
    ids: dict[str, list[str]] = collections.defaultdict(list)
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels", "patient_id", "split"])
        i = 0
        for cell, n_train, n_val in plan:
            for split in ["train"] * n_train + ["val"] * n_val:
                rel = f"scans/img{i:03d}.png"
                write_png(root / rel, PNG_KINDS[i % len(PNG_KINDS)], 16, 20, seed=i)
                writer.writerow([rel, cell, f"P{i:03d}", split])
                ids[cell].append(rel)
                i += 1
    return ids


def test_nan_empty_and_no_finding_labels_are_negatives_of_every_task_never_tasks(tmp_path):
    plan = [("Hernia", 3, 2), ("Mass", 3, 2), ("NaN", 3, 2), ("", 3, 2), ("No Finding", 3, 2), ("nan", 2, 1)]
    ids = _write_labelled_csv(tmp_path / "archive", plan)
    source = CsvSource(tmp_path / "archive")
    cache = build_cache(source, size=16, workers=1, progress=False)
    assert len(cache) == 28  # no-finding images are cached like any other

    pool = source.task_pool(cache.index, min_train=2, min_val=1)
    assert pool.diseases == ["Hernia", "Mass"]
    no_finding = {i for cell in ("NaN", "", "No Finding", "nan") for i in ids[cell]}
    split = dict(zip(cache.index["image_id"], cache.index["split"]))
    for task in pool.tasks.values():
        assert {i for i in no_finding if split[i] == "train"} <= set(task.train_neg)
        assert {i for i in no_finding if split[i] == "val"} <= set(task.test_neg)
        assert not no_finding & set(task.train_pos + task.test_pos)

    # The words are the source option no_finding: without "NaN" it is a label like any other.
    own = CsvSource(tmp_path / "archive", no_finding=["No Finding", ""])
    assert own.task_pool(cache.index, min_train=2, min_val=1).diseases == ["Hernia", "Mass", "NaN", "nan"]
    assert own.describe() == source.describe()  # a task-pool setting: the cache key is unchanged
    with pytest.raises(DataError, match=r"csv: no_finding = 5 is not valid: use a list of labels"):
        CsvSource(tmp_path / "archive", no_finding=5)


def test_symlink_loops_are_skipped_and_listed_like_unreadable_images(tmp_path):
    layout = write_csv_layout(tmp_path / "archive", n_images=4)
    root = layout["root"]
    os.symlink(root, root / "loop")                       # root/loop -> root
    os.symlink(root / "b.png", root / "a.png")            # a.png -> b.png -> a.png
    os.symlink(root / "a.png", root / "b.png")
    os.symlink(root / "d2", root / "d1")                  # d1 -> d2 -> d1 (folders)
    os.symlink(root / "d1", root / "d2")
    write_png(root / "top.png", "grey8", 48, 64, seed=9)  # the root folder itself gets scanned
    with open(layout["csv"], "a", newline="") as fh:
        csv.writer(fh).writerows([["a.png", "A", "P7"], ["d1/x.png", "C", "P8"], ["top.png", "A", "P9"],
                                  ["loop/loop/scans/s0/img0.png", "A", "P0"]])

    index = CsvSource(root).build_index()
    assert len(index) == 8
    cache = build_cache(CsvSource(root), size=16, workers=1, progress=False)
    skipped = {s["image_id"]: s for s in cache.report["skipped"]}
    assert sorted(skipped) == ["a.png", "d1/x.png"]
    for entry in skipped.values():
        assert entry["kind"] == "unreadable" and "symbolic link loop" in entry["reason"]
    assert str(root / "a.png") in skipped["a.png"]["reason"]
    assert len(cache) == 6 and "loop/loop/scans/s0/img0.png" in set(cache.index["image_id"])

    with pytest.raises(DataError, match=r"csv: root .*d1 is a symbolic link loop"):
        CsvSource(root / "d1")
    with pytest.raises(DataError, match=r"csv: image_root .*d2 is a symbolic link loop"):
        CsvSource(root, image_root=str(root / "d2")).build_index()


def test_one_hot_columns_on_a_small_listing(tmp_path):
    root = tmp_path / "onehot"
    root.mkdir()
    (root / "labels.csv").write_text(
        "Path,Edema,Fracture\n"
        "d/patient001/a.png,1.0,-1.0\n"
        "d/patient001/b.png,,0.0\n"
        "d/patient002/c.png,-1.0,1.0\n"
    )
    options = dict(path_column="Path", label_columns=["Edema", "Fracture"], patient_pattern=r"patient(\d+)",
                   assume_present=True)
    index = CsvSource(root, **options).build_index()
    assert list(index["labels"]) == [["Edema"], [], ["Fracture"]]
    assert list(index["patient_id"]) == ["001", "001", "002"]
    positive = CsvSource(root, uncertain_as="positive", **options).build_index()
    assert list(positive["labels"]) == [["Edema", "Fracture"], [], ["Edema", "Fracture"]]
    (root / "labels.csv").write_text("Path,Edema,Fracture\nd/patient001/a.png,yes,0\n")
    with pytest.raises(DataError, match="label column 'Edema' holds 'yes' in row 1"):
        CsvSource(root, **options).build_index()


def test_real_chexpert_listing(real_metadata_dir):
    source = CsvSource(real_metadata_dir, csv="chexpert_train.csv.gz", path_column="Path",
                       label_columns=CHEXPERT_LABELS, patient_pattern=r"(patient\d+)", view_column="AP/PA",
                       default_view="L", assume_present=True)
    index = source.build_index()

    positives, patients, views = collections.Counter(), set(), collections.Counter()
    with gzip.open(real_metadata_dir / "chexpert_train.csv.gz", "rt", newline="") as fh:
        for row in csv.DictReader(fh):
            positives.update(k for k in CHEXPERT_LABELS if row[k] in ("1.0", "1"))
            patients.add(re.search(r"patient\d+", row["Path"]).group(0))
            views[row["AP/PA"] or "L"] += 1
    assert len(index) == 223_414 and index["patient_id"].nunique() == len(patients) == 64_540
    assert collections.Counter(x for labels in index["labels"] for x in labels) == positives
    assert collections.Counter(index["view"]) == views and views["L"] == 32_387
    # The split is by patient, so all studies of a patient share it.
    assert index.groupby("patient_id")["split"].nunique().max() == 1
