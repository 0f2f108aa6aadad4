"""The generic CSV source: a user's own archive, and CheXpert's real one-hot listing."""

from __future__ import annotations

import collections
import csv
import gzip
import re

import numpy as np
import pytest

from _fixtures_layouts import PNG_KINDS, centre_square, expected_grey_uint8, structured_array, write_csv_layout
from _real_metadata import real_metadata_dir  # noqa: F401
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
