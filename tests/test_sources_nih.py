"""NIH ChestX-ray14 source: the real folder layouts with synthetic images, and the real label CSV."""

from __future__ import annotations

import collections
import csv
import gzip
import os
import time
import zipfile

import numpy as np
import pytest

from _fixtures_layouts import (
    NIH_HEADER, PNG_KINDS, centre_square, expected_grey_uint8, structured_array, write_nih_layout,
)
from _real_metadata import FILES, MetadataUnavailable, _extract, real_metadata_dir  # noqa: F401
from cxrtune.data.index import patient_split, read_index, write_index
from cxrtune.data.sources.base import make_source, source_names
from cxrtune.data.sources.nih import NihSource
from cxrtune.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("kaggle", [False, True], ids=["nih-box", "kaggle-mirror"])
def test_index_matches_the_layout(tmp_path, kaggle):
    layout = write_nih_layout(tmp_path / "nih", n_patients=6, images_per_patient=2, kaggle=kaggle)
    source = make_source("nih", layout["root"])
    index = source.build_index()

    assert sorted(index["image_id"]) == sorted(layout["labels"])
    for row in index.itertuples():
        assert row.labels == layout["labels"][row.image_id]
        assert row.patient_id == layout["patient"][row.image_id]
        assert row.view == layout["view"][row.image_id]
        assert row.split == ("test" if row.image_id in layout["test"] else "train")
        assert row.path == str(layout["images"][row.image_id])
    assert index["labels"].map(lambda v: "No Finding" in v).sum() == 4  # kept as a label
    first = index.set_index("image_id").loc["00000001_000.png"]
    assert (first.age, first.sex, first.follow_up, first.original_width, first.original_height) == (41, "F", 0, 64, 48)
    assert source.report == {"listed": 12, "missing": 0, "csv": "Data_Entry_2017_v2020.csv", "indexed": 12,
                             "split": "official test_list.txt"}


def test_every_png_kind_decodes_to_8bit_grey_by_min_max_then_quantise(tmp_path):
    layout = write_nih_layout(tmp_path / "nih", n_patients=2, images_per_patient=2)
    source = NihSource(layout["root"])
    index = source.build_index()
    assert set(layout["kind"].values()) == set(PNG_KINDS)
    images = source.read_images(index, size=48)  # 64 x 48 PNGs: centre crop, no resampling
    for (image_id, image), i in zip(zip(index["image_id"], images), range(len(index))):
        kind = layout["kind"][image_id]
        raw = structured_array(kind, 48, 64, seed=i)
        assert image.dtype == np.uint8 and image.shape == (48, 48)
        np.testing.assert_array_equal(image, centre_square(expected_grey_uint8(raw)), err_msg=kind)
        if kind == "grey16":  # raw values span 1000..3000 of 65535; min-max restores the contrast
            assert int(image.max()) - int(image.min()) > 150


def test_val_from_train_moves_hash_validation_patients_only(tmp_path):
    layout = write_nih_layout(tmp_path / "nih", n_patients=30, images_per_patient=1)
    index = NihSource(layout["root"], val_from_train=True).build_index()
    for row in index.itertuples():
        if row.image_id in layout["test"]:
            assert row.split == "test"
        else:
            assert row.split == ("val" if patient_split(row.patient_id) == "val" else "train")
    assert set(index["split"]) == {"train", "val", "test"}


def test_without_official_lists_patients_split_by_hash(tmp_path):
    layout = write_nih_layout(tmp_path / "nih", n_patients=30, images_per_patient=2, official_lists=False)
    index = NihSource(layout["root"]).build_index()
    expected = [patient_split(layout["patient"][i]) for i in index["image_id"]]
    assert list(index["split"]) == expected and set(expected) == {"train", "val"}
    # official_split=False ignores lists that are present
    with_lists = write_nih_layout(tmp_path / "nih2", n_patients=30, images_per_patient=1)
    assert set(NihSource(with_lists["root"], official_split=False).build_index()["split"]) == {"train", "val"}


def test_original_csv_name_with_trailing_comma_and_zero_padded_ids(tmp_path):
    layout = write_nih_layout(tmp_path / "nih", n_patients=3, images_per_patient=1, csv_name="Data_Entry_2017.csv")
    lines = layout["csv"].read_text().splitlines()
    # The 2017 file ends every line with a comma; the first release wrote ages as "041Y".
    rows = [lines[0] + ","]
    for line in lines[1:]:
        f = line.split(",")
        f[3], f[4] = f[3].zfill(5), f[4].zfill(3) + "Y"
        rows.append(",".join(f) + ",")
    layout["csv"].write_text("\n".join(rows) + "\n")
    index = NihSource(layout["root"]).build_index()
    assert list(index["patient_id"]) == ["1", "2", "3"]  # same hash as the 2020 file's "1"
    assert list(index["age"]) == [41, 42, 43]


def test_views_option_and_index_roundtrip(tmp_path):
    layout = write_nih_layout(tmp_path / "nih", n_patients=4, images_per_patient=2)
    index = NihSource(layout["root"], views=["PA"]).build_index()
    assert set(index["view"]) == {"PA"} and len(index) == 4
    back = read_index(write_index(index, tmp_path / "index.parquet"))
    assert list(back["labels"]) == list(index["labels"])


# -- bad input --------------------------------------------------------------------------------
def test_missing_folder_and_missing_csv(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        NihSource(tmp_path / "nowhere").build_index()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no label CSV .*Data_Entry_2017_v2020.csv, Data_Entry_2017.csv"):
        NihSource(tmp_path / "empty").build_index()
    with pytest.raises(DataError, match="csv = 'other.csv' does not exist"):
        NihSource(tmp_path / "empty", csv="other.csv").build_index()
    with pytest.raises(ConfigError, match="NihOptions has no field 'allow_mising'"):
        NihSource(tmp_path, allow_mising=True)


def test_wrong_header_names_the_missing_columns(tmp_path):
    layout = write_nih_layout(tmp_path / "nih", n_patients=2, images_per_patient=1)
    text = layout["csv"].read_text().replace("Patient ID", "PatientID", 1)
    layout["csv"].write_text(text)
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['Patient ID'\].*found \[.*'PatientID'"):
        NihSource(layout["root"]).build_index()


def test_listed_image_missing_on_disk(tmp_path):
    omit = ["00000002_000.png", "00000004_001.png"]
    layout = write_nih_layout(tmp_path / "nih", n_patients=4, images_per_patient=2, omit_images=omit)
    with pytest.raises(DataError, match=r"2 of 8 listed images are missing on disk \(e.g. 00000002_000.png"):
        NihSource(layout["root"]).build_index()
    index = NihSource(layout["root"], allow_missing=True).build_index()
    assert sorted(index["image_id"]) == sorted(layout["images"])
    metadata_only = NihSource(layout["root"], assume_present=True).build_index()
    assert len(metadata_only) == 8
    assert set(metadata_only.loc[metadata_only["image_id"].isin(omit), "path"]) == {""}


def test_lists_that_cut_a_patient_in_two_are_refused(tmp_path):
    layout = write_nih_layout(tmp_path / "nih", n_patients=6, images_per_patient=2)
    test_list = layout["root"] / "test_list.txt"
    test_list.write_text(test_list.read_text() + "00000001_000.png\n")
    train_list = layout["root"] / "train_val_list.txt"
    train_list.write_text(train_list.read_text().replace("00000001_000.png\n", ""))
    with pytest.raises(DataError, match="patient '1' has images in test_list.txt .* patient-disjoint"):
        NihSource(layout["root"]).build_index()
    train_list.write_text(train_list.read_text() + "00000001_000.png\n")
    with pytest.raises(DataError, match="listed in both train_val_list.txt and test_list.txt"):
        NihSource(layout["root"]).build_index()


def test_task_pool_keeps_no_finding_as_negative_and_evaluates_on_test(tmp_path):
    labels = ["Hernia"] * 3 + ["No Finding"] * 3 + ["Mass"]
    layout = write_nih_layout(tmp_path / "nih", n_patients=30, images_per_patient=1, labels=labels)
    source = NihSource(layout["root"])
    index = source.build_index()
    assert source.task_options(index)["eval_splits"] == ("test",)  # no val in the official split
    pool = source.task_pool(index, min_train=3, min_val=1)
    assert "No Finding" not in pool.diseases and "Hernia" in pool.diseases
    hernia = pool.tasks["Hernia"]
    by_id = index.set_index("image_id")
    assert {by_id.loc[i, "split"] for i in hernia.test_pos + hernia.test_neg} == {"test"}
    assert any(by_id.loc[i, "labels"] == ["No Finding"] for i in hernia.train_neg)
    with_val = NihSource(layout["root"], val_from_train=True)
    assert with_val.task_options(with_val.build_index())["eval_splits"] == ("val",)


def test_registered_under_its_name():
    assert {"nih", "padchest", "csv"} <= set(source_names())


# -- the real label file ------------------------------------------------------------------------
def test_real_data_entry_csv(real_metadata_dir):
    source = NihSource(real_metadata_dir, assume_present=True)
    start = time.perf_counter()
    index = source.build_index()
    seconds = time.perf_counter() - start
    print(f"\nNIH Data_Entry_2017_v2020.csv.gz: {len(index):,} rows indexed in {seconds:.2f} s")

    # An independent count with the csv module.
    counts, patients, views = collections.Counter(), set(), collections.Counter()
    with gzip.open(real_metadata_dir / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as fh:
        reader = csv.reader(fh)
        assert ",".join(next(reader)) == NIH_HEADER
        for row in reader:
            counts.update(row[1].split("|"))
            patients.add(row[3])
            views[row[6]] += 1
    assert len(index) == 112_120 and index["patient_id"].nunique() == 30_805 == len(patients)
    found = collections.Counter(x for labels in index["labels"] for x in labels)
    assert found == counts
    # The rarest findings, as the study reports them.
    assert [found[k] for k in ("Hernia", "Pneumonia", "Fibrosis", "Edema", "Emphysema", "Cardiomegaly")] == [
        227, 1_431, 1_686, 2_303, 2_516, 2_776]
    assert collections.Counter(index["view"]) == views
    assert set(index["split"]) == {"train", "val"}
    val_share = (index.drop_duplicates("patient_id")["split"] == "val").mean()
    assert 0.18 < val_share < 0.22
    assert index["age"].notna().all() and index["original_width"].min() > 1000

    pool = source.task_pool(index)
    assert "No Finding" not in pool.diseases
    assert set(pool.diseases) == set(counts) - {"No Finding"}  # all 14 findings pass 15/6


# -- the metadata helper ------------------------------------------------------------------------
def test_metadata_helper_refuses_a_tampered_wheel_and_leaves_nothing(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in FILES:
            archive.writestr(f"torchxrayvision/data/{name}", b"not the real file")
    target = tmp_path / "cache" / "txv"
    with pytest.raises(MetadataUnavailable, match="wrong SHA-256"):
        _extract(wheel, target)
    assert not target.exists() and os.listdir(tmp_path / "cache") == []


def test_kaggle_layout_goes_through_the_image_cache(tmp_path):
    from cxrtune.data.cache import get_cache

    layout = write_nih_layout(tmp_path / "nih", n_patients=3, images_per_patient=2, kaggle=True)
    cache = get_cache("nih", layout["root"], size=48, workers=1, progress=False, cache_dir=tmp_path / "cache")
    assert len(cache) == 6
    for image_id, row in zip(cache.index["image_id"], cache.index["cache_row"]):
        i = sorted(layout["labels"]).index(image_id)  # images were written in name order
        raw = structured_array(layout["kind"][image_id], 48, 64, seed=i)
        np.testing.assert_array_equal(cache.images[row], centre_square(expected_grey_uint8(raw)))
