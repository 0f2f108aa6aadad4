"""PadChest source and the study's rare-disease task builder, on fixtures in the real layout and on
the real 160,861-row label CSV."""

from __future__ import annotations

import ast
import collections
import csv
import gzip
import hashlib
import time

import numpy as np
import pytest

from _fixtures_layouts import (
    PADCHEST_LABEL_CELLS, PNG_KINDS, centre_square, expected_grey_uint8, structured_array,
    write_padchest_layout,
)
from _real_metadata import real_metadata_dir  # noqa: F401
from cxrtune.data.index import patient_split
from cxrtune.data.sources.base import make_source
from cxrtune.data.sources.padchest import (
    DEFAULT_EXCLUSIONS, TASK_DEFAULTS, PadchestSource, load_exclusions, parse_label_entries, parse_labels,
    read_exclusions,
)
from cxrtune.data.tasks import sample_episodes
from cxrtune.errors import DataError, TaskError

PADCHEST_CSV_GZ = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
#: The reference study's ten diseases with their (train, val) positives (seed-facts).
STUDY_COUNTS = {
    "calcified granuloma": (96, 27), "interstitial pattern": (93, 18), "callus rib fracture": (88, 21),
    "hiatal hernia": (81, 20), "hemidiaphragm elevation": (81, 23), "bronchiectasis": (40, 10),
    "fibrotic band": (38, 11), "reticular interstitial pattern": (32, 8), "pulmonary mass": (30, 11),
    "pulmonary fibrosis": (24, 4),
}
STUDY_DISEASES = set(STUDY_COUNTS)
#: The ImageDir folders whose images reproduce all 20 of those counts (58,324 images; the study
#: reports 58,337 on disk): the one folder subset that matches them (an integer program over the
#: 52 folders; adding folder 50, one image, is the only other solution).
STUDY_FOLDERS = {"0", "3", "9", "13", "15", "16", "20", "21", "22", "23", "25", "27", "29", "35", "37", "39",
                 "49", "54"}


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))


# -- index ----------------------------------------------------------------------------------------
def test_index_holds_the_images_on_disk_by_default(tmp_path):
    layout = write_padchest_layout(tmp_path / "pc", n_rows=16, on_disk=range(0, 16, 2))
    source = make_source("padchest", layout["root"])
    index = source.build_index()
    rows = {r["image_id"]: r for r in layout["rows"]}
    assert sorted(index["image_id"]) == sorted(i for i, r in rows.items() if r["on_disk"])
    parsed = dict(PADCHEST_LABEL_CELLS)
    for row in index.itertuples():
        expected = rows[row.image_id]
        assert row.labels == parsed[expected["labels_cell"]]
        assert row.view == expected["projection"]
        assert row.path == str(layout["root"] / expected["image_dir"] / row.image_id)
        assert row.split == patient_split(expected["patient"])
        assert row.label_method == "Physician" and row.age == 65
        assert row.label_entries == len(parse_label_entries(expected["labels_cell"]))
    assert source.report == {"listed": 16, "missing": 8, "csv": layout["csv"].name, "indexed": 8}


def test_assume_present_and_strict_missing(tmp_path):
    layout = write_padchest_layout(tmp_path / "pc", n_rows=8, on_disk=[0, 1, 2])
    everything = PadchestSource(layout["root"], assume_present=True).build_index()
    assert len(everything) == 8
    assert list(everything["path"]) == [str(r["path"]) for r in layout["rows"]]
    with pytest.raises(DataError, match=r"5 of 8 listed images are missing on disk"):
        PadchestSource(layout["root"], allow_missing=False).build_index()


def test_images_in_one_flat_folder_are_found(tmp_path):
    layout = write_padchest_layout(tmp_path / "pc", n_rows=4)
    for row in layout["rows"]:
        row["path"].rename(layout["root"] / row["image_id"])
    index = PadchestSource(layout["root"], allow_missing=False).build_index()
    assert set(index["path"]) == {str(layout["root"] / r["image_id"]) for r in layout["rows"]}


def test_every_png_kind_decodes_by_the_study_rule(tmp_path):
    layout = write_padchest_layout(tmp_path / "pc", n_rows=4)
    source = PadchestSource(layout["root"])
    index = source.build_index()
    assert list(index["image_id"]) == [r["image_id"] for r in layout["rows"]]
    for i, image in enumerate(source.read_images(index, size=48)):
        raw = structured_array(PNG_KINDS[i], 48, 64, seed=i)
        np.testing.assert_array_equal(image, centre_square(expected_grey_uint8(raw)), err_msg=PNG_KINDS[i])


def test_label_cells_parse_like_the_real_file():
    for cell, expected in PADCHEST_LABEL_CELLS:
        assert parse_labels(cell) == expected
    assert parse_labels(float("nan")) == [] == parse_label_entries("nan")
    assert parse_label_entries("['bronchiectasis', '', ' bronchiectasis']") == ["bronchiectasis", "", "bronchiectasis"]
    assert parse_labels("'single'") == ["single"]
    for bad in ("['unclosed'", "__import__('os').system('true')", "[1, 2]", "{'a': 1}"):
        with pytest.raises((ValueError, SyntaxError)):
            parse_labels(bad)


def test_unparseable_labels_name_the_row(tmp_path):
    rows = [{"labels": "['normal']"}, {"labels": "['normal']"}, {"labels": "['pneumonia', 'nod"}]
    layout = write_padchest_layout(tmp_path / "pc", rows=rows)
    with pytest.raises(DataError, match=r"Labels in row 3 \(line 4\) .* not a Python list of strings"):
        PadchestSource(layout["root"]).build_index()


def test_missing_root_csv_and_wrong_header(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        PadchestSource(tmp_path / "nowhere").build_index()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no label CSV .*PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"):
        PadchestSource(tmp_path / "empty").build_index()
    layout = write_padchest_layout(tmp_path / "pc", n_rows=2)
    layout["csv"].write_text(layout["csv"].read_text().replace("Projection", "Proj", 1))
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['Projection'\]"):
        PadchestSource(layout["root"]).build_index()
    empty_root = write_padchest_layout(tmp_path / "pc2", n_rows=3, on_disk=[])
    with pytest.raises(DataError, match="none of the 3 images listed .* is under"):
        PadchestSource(empty_root["root"]).build_index()


# -- exclusion list -------------------------------------------------------------------------------
def test_exclusion_file_is_grouped_data():
    entries = read_exclusions(DEFAULT_EXCLUSIONS)
    labels = [label for _, label in entries]
    assert len(labels) == len(set(labels)) > 100
    assert not STUDY_DISEASES & set(labels)
    # The common diseases the study names are all excluded.
    assert {"pneumonia", "pleural effusion", "cardiomegaly", "nodule", "atelectasis", "laminar atelectasis",
            "emphysema", "scoliosis", "COPD signs", "aortic elongation", "rib fracture", "consolidation",
            "granuloma", "normal"} <= set(labels)
    # Every label sits under a group heading (a comment line starting with '# ---').
    lines = DEFAULT_EXCLUSIONS.read_text().splitlines()
    first_group = next(i for i, line in enumerate(lines) if line.startswith("# ---"))
    assert min(number for number, _ in entries) > first_group + 1


def _small_archive(tmp_path):
    """Enough single-label PA images for tasks: 20 patients per label, one image each."""
    rows = []
    for label, n in (("hiatal hernia", 40), ("normal", 60), ("goiter", 40), ("rare finding", 6)):
        rows += [{"labels": f"['{label}']", "patient": f"{label[:3]}{i}", "projection": "PA"} for i in range(n)]
    rows.append({"labels": "['pacemaker', 'normal']", "patient": "x1"})
    rows.append({"labels": "['']", "patient": "x2"})  # a single empty label: skipped
    rows.append({"labels": "['goiter', '']", "patient": "x5"})  # two entries for the study
    rows.append({"labels": "['goiter']", "patient": "x3", "projection": "AP_horizontal"})
    rows.append({"labels": "['goiter']", "patient": "x4", "projection": "L"})
    return write_padchest_layout(tmp_path / "pc", rows=rows, size=(8, 8))


def test_task_pool_follows_the_protocol_on_a_small_archive(tmp_path):
    layout = _small_archive(tmp_path)
    source = PadchestSource(layout["root"])
    index = source.build_index()
    pool = source.task_pool(index, min_train=10, min_val=2)
    assert pool.diseases == ["goiter", "hiatal hernia"]  # normal excluded, rare finding too few
    single = {r["image_id"] for r in layout["rows"] if r["projection"] == "PA"
              and len(parse_label_entries(r["labels_cell"])) == 1 and r["labels_cell"] != "['']"}
    assert set(pool.patient_of) == single  # no AP_horizontal, no lateral, no empty label
    goiter = pool.tasks["goiter"]
    labels = index.set_index("image_id")["labels"]
    assert all(labels[i] == ["goiter"] for i in goiter.train_pos + goiter.test_pos)
    assert {labels[i][0] for i in goiter.train_neg} == {"hiatal hernia", "normal", "rare finding"}
    supine = source.task_pool(index, min_train=10, min_val=2, views=("PA", "AP", "AP_horizontal"))
    assert len(supine.patient_of) == len(pool.patient_of) + 1
    two_entries = next(r["image_id"] for r in layout["rows"] if r["labels_cell"] == "['goiter', '']")
    assert two_entries not in pool.patient_of  # the study counts list entries
    distinct = PadchestSource(layout["root"], single_label="labels")
    assert two_entries in distinct.task_pool(index, min_train=10, min_val=2).patient_of


def test_too_few_positives_are_a_clear_error(tmp_path):
    source = PadchestSource(_small_archive(tmp_path)["root"])
    index = source.build_index()
    with pytest.raises(TaskError, match=r"'rare finding' has \d+ training and \d+ evaluation positives"):
        source.task_pool(index, diseases=["rare finding"])
    pool = source.task_pool(index, min_train=10, min_val=2)
    with pytest.raises(TaskError, match="'goiter': 50 shots requested but the training pool holds"):
        sample_episodes(pool, shots=(50,), trials=1, strict=True, diseases=["goiter"])


def test_exclusion_override_is_checked_against_the_csv(tmp_path):
    layout = _small_archive(tmp_path)
    own = tmp_path / "mine.txt"
    own.write_text("# my list\nnormal\npacemaker\n")
    source = PadchestSource(layout["root"], exclusions=own)
    index = source.build_index()
    assert source.task_options(index)["exclude"] == ("normal", "pacemaker")
    assert "rare finding" in source.task_pool(index, min_train=1, min_val=1).diseases

    own.write_text("normal\nhiatal hernai\n")
    with pytest.raises(DataError, match=r"'hiatal hernai' \(.*mine.txt, line 2\) is not a PadChest label.*"
                                        r"did you mean 'hiatal hernia'"):
        PadchestSource(layout["root"], exclusions=own).task_pool(index)
    with pytest.raises(DataError, match="'Normal' .* is not a PadChest label"):
        PadchestSource(layout["root"]).task_pool(index, exclude=["Normal"])
    pool = PadchestSource(layout["root"]).task_pool(index, exclude=["goiter"], min_train=10, min_val=2)
    assert "normal" in pool.diseases and "goiter" not in pool.diseases
    with pytest.raises(DataError, match="exclusion list .*missing.txt does not exist"):
        PadchestSource(layout["root"], exclusions=tmp_path / "missing.txt")


# -- the real label file --------------------------------------------------------------------------
def _independent_protocol(path, excluded, folders=None):
    """The protocol written out with the csv module, a plain loop and hashlib: an image is
    single-label when its Labels list has exactly one entry, and that entry is not empty.
    Returns the kept diseases with their counts, on all rows and on ``folders`` only."""
    counts = {"all": (collections.Counter(), collections.Counter()),
              "folders": (collections.Counter(), collections.Counter())}
    vocabulary, seen = set(), {}
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        at = {name: header.index(name) for name in ("Labels", "Projection", "PatientID", "ImageDir")}
        for fields in reader:
            row = {name: fields[i] for name, i in at.items()}
            cell = row["Labels"].strip()
            if cell not in seen:
                seen[cell] = [] if cell in ("", "nan") else [x.strip() for x in ast.literal_eval(cell)]
            entries = seen[cell]  # 103 rows say "nan"
            vocabulary.update(x for x in entries if x)
            if row["Projection"] not in ("PA", "AP") or len(entries) != 1 or not entries[0]:
                continue
            is_val = int(hashlib.md5(row["PatientID"].encode()).hexdigest(), 16) % 5 == 0
            for subset in ("all", "folders") if row["ImageDir"] in folders else ("all",):
                counts[subset][1 if is_val else 0][entries[0]] += 1
    kept = {}
    for subset, (train, val) in counts.items():
        kept[subset] = {d: (train[d], val[d]) for d in set(train) | set(val)
                        if d not in excluded and (train[d] >= 15 and val[d] >= 6 or d == "pulmonary fibrosis")}
    return kept["all"], kept["folders"], vocabulary


def test_real_padchest_protocol(real_metadata_dir):
    source = PadchestSource(real_metadata_dir, assume_present=True)
    start = time.perf_counter()
    index = source.build_index()
    built = time.perf_counter() - start
    pool = source.task_pool(index)
    seconds = time.perf_counter() - start
    summary = pool.summary().sort_values("train_pos", ascending=False)
    print(f"\nPadChest label CSV: {len(index):,} rows indexed in {built:.2f} s, task pool in {seconds - built:.2f} s")
    print(summary.to_string(index=False))
    assert len(index) == 160_861 and index["patient_id"].nunique() == 67_625

    # On the images the study had, the protocol gives exactly its ten diseases and counts.
    folders = index["path"].map(lambda p: p.rsplit("/", 2)[-2])
    study_index = index[folders.isin(STUDY_FOLDERS)]
    assert len(study_index) == 58_324
    study = source.task_pool(study_index).summary()
    assert {r.disease: (r.train_pos, r.val_pos) for r in study.itertuples()} == STUDY_COUNTS

    # On the full label file: 19 diseases, the study's ten among them (see the exclusion file).
    assert len(pool.diseases) == 19 and STUDY_DISEASES <= set(pool.diseases)
    excluded = set(load_exclusions())
    kept, kept_study, vocabulary = _independent_protocol(real_metadata_dir / PADCHEST_CSV_GZ, excluded, STUDY_FOLDERS)
    assert {r.disease: (r.train_pos, r.val_pos) for r in summary.itertuples()} == kept
    assert kept_study == STUDY_COUNTS
    assert (summary["train_neg"] == TASK_DEFAULTS["max_train_neg"]).all()
    assert (summary["val_neg"] == TASK_DEFAULTS["max_val_neg"]).all()
    # The shipped exclusion list names only real labels; overrides are checked against the same set.
    assert excluded <= vocabulary == source.label_vocabulary()

    # Rows whose one entry is empty ("['']") are neither positives nor negatives.
    empty = index.loc[index["labels"].map(len).eq(0) & index["view"].isin(["PA", "AP"]), "image_id"]
    assert len(empty) > 500 and not set(empty) & set(pool.patient_of)

    # Counting distinct labels instead adds "humeral fracture" (its ['humeral fracture', ''] rows).
    distinct = PadchestSource(real_metadata_dir, assume_present=True, single_label="labels").task_pool(index)
    assert set(distinct.diseases) - set(pool.diseases) == {"humeral fracture"}


def test_real_padchest_report_split_on_the_studys_images(real_metadata_dir):
    """A sweep's validation/report split on a PadChest-sized pool (the study's 58,324 images, its ten
    findings with 4-27 evaluation positives): every finding is split, patient-disjoint, each half
    holding half its positives (pulmonary fibrosis: 2 and 2), so a finding's AUROC on either half
    rests on about half the positives (its standard error about 1.4x wider). The printed table is
    the one in docs/report.md."""
    import math

    from cxrtune.data.tasks import split_for_report

    source = PadchestSource(real_metadata_dir, assume_present=True)
    index = source.build_index()
    study = index[index["path"].map(lambda p: p.rsplit("/", 2)[-2]).isin(STUDY_FOLDERS)]
    pool = source.task_pool(study)
    validation, report, kept = split_for_report(pool)
    assert kept == [] and set(validation.tasks) == set(report.tasks) == set(STUDY_COUNTS)
    print()
    for disease, task in sorted(pool.tasks.items()):
        halves = validation.tasks[disease], report.tasks[disease]
        positives = [len(h.test_pos) for h in halves]
        assert sum(positives) == len(task.test_pos) and abs(positives[0] - positives[1]) <= 1
        assert sorted(halves[0].test_pos + halves[1].test_pos) == sorted(task.test_pos)
        assert sum(len(h.test_neg) for h in halves) == len(task.test_neg)
        patients = [{pool.patient_of[i] for i in h.test_pos + h.test_neg} for h in halves]
        assert not patients[0] & patients[1]
        print(f"{disease}: {len(task.test_pos)} evaluation positives -> {positives[0]} + {positives[1]}, "
              f"negatives {len(task.test_neg)} -> {len(halves[0].test_neg)} + {len(halves[1].test_neg)}; "
              f"standard error x{math.sqrt(len(task.test_pos) / min(positives)):.2f}")
    assert (len(validation.tasks["pulmonary fibrosis"].test_pos), len(report.tasks["pulmonary fibrosis"].test_pos)) == (2, 2)
