"""Few-shot task pool and episode sampler: the study's protocol on a hand-built index."""

from __future__ import annotations


import pandas as pd
import pytest

from cxrtune.data.index import validate_index
from cxrtune.data.tasks import (
    ShotsCappedWarning, build_task_pool, load_episodes, sample_episodes, save_episodes,
)
from cxrtune.errors import TaskError


def make_index(counts: dict[str, tuple[int, int]], extra_rows: list[dict] | None = None) -> pd.DataFrame:
    """One image per patient; counts = {label: (n_train, n_val)}."""
    rows = []
    for label, (n_train, n_val) in counts.items():
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                pid = f"{label[:3]}-{split}-{i}"
                rows.append({"image_id": f"{pid}.png", "patient_id": pid, "labels": [label],
                             "view": "PA", "split": split, "path": ""})
    rows += extra_rows or []
    return validate_index(pd.DataFrame(rows))


COUNTS = {"hernia": (30, 8), "mass": (16, 6), "rare": (14, 6), "fibrosis": (4, 2), "normal": (200, 60)}


def test_pool_keeps_diseases_by_minimum_counts_and_forced_include():
    pool = build_task_pool(make_index(COUNTS), exclude={"normal"}, min_train=15, min_val=6,
                           force_include={"fibrosis"})
    assert sorted(pool.diseases) == ["fibrosis", "hernia", "mass"]  # rare: 14 < 15 training positives
    summary = pool.summary().set_index("disease")
    assert summary.loc["hernia", "train_pos"] == 30 and summary.loc["hernia", "val_pos"] == 8
    # negatives are single-label images of every other label, excluded labels included
    assert summary.loc["hernia", "train_neg"] == 16 + 14 + 4 + 200
    assert not set(pool.tasks["hernia"].train_neg) & set(pool.tasks["hernia"].train_pos)


def test_multi_label_rows_and_other_views_never_enter_a_task_and_unlabelled_rows_are_negatives():
    extra = [
        {"image_id": "multi.png", "patient_id": "m", "labels": ["hernia", "mass"], "view": "PA", "split": "train", "path": ""},
        {"image_id": "blank.png", "patient_id": "b", "labels": [""], "view": "PA", "split": "train", "path": ""},
        {"image_id": "lat.png", "patient_id": "l", "labels": ["hernia"], "view": "L", "split": "train", "path": ""},
    ]
    pool = build_task_pool(make_index(COUNTS, extra), views=("PA", "AP"), exclude={"normal"})
    every_id = {i for t in pool.tasks.values() for i in t.train_pos + t.train_neg + t.test_pos + t.test_neg}
    assert not every_id & {"multi.png", "lat.png"}
    # an empty label means "no finding": a negative of every task, never a positive
    assert all("blank.png" in t.train_neg and "blank.png" not in t.train_pos for t in pool.tasks.values())
    # ... unless "" is left out of no_finding: then an unlabelled image is in no task at all
    strict = build_task_pool(make_index(COUNTS, extra), views=("PA", "AP"), exclude={"normal"}, no_finding=["normal"])
    assert not any("blank.png" in t.train_neg for t in strict.tasks.values())


NO_FINDING_ROWS = [
    {"image_id": f"{word or 'empty'}-{split}-{i}.png", "patient_id": f"{word}-{split}-{i}", "labels": labels,
     "view": "PA", "split": split, "path": ""}
    for word, labels in (("No Finding", ["No Finding"]), ("NaN", ["NaN"]), ("nan", ["nan"]), ("", []),
                         ("Normal", ["Normal"]))
    for split, n in (("train", 20), ("val", 8)) for i in range(n)
]


def test_no_finding_labels_are_never_tasks_and_are_negatives_of_every_task():
    index = make_index({"hernia": (30, 8), "mass": (16, 6)}, NO_FINDING_ROWS)
    pool = build_task_pool(index)  # 20/8 images each: enough for a task, were they labels
    assert sorted(pool.diseases) == ["hernia", "mass"]
    no_finding = {r["image_id"] for r in NO_FINDING_ROWS}
    for task in pool.tasks.values():
        assert {i for i in no_finding if "-train-" in i} <= set(task.train_neg)
        assert {i for i in no_finding if "-val-" in i} <= set(task.test_neg)
        assert not no_finding & set(task.train_pos + task.test_pos)
    # the list is configurable: without "NaN", it is a label like any other
    assert "NaN" in build_task_pool(index, no_finding=["No Finding", ""]).diseases
    # a finding next to a no-finding word is that finding
    mixed = {"image_id": "mixed.png", "patient_id": "mixed", "labels": ["No Finding", "hernia"], "view": "PA",
             "split": "train", "path": ""}
    assert "mixed.png" in build_task_pool(make_index(COUNTS, [mixed]), exclude={"normal"}).tasks["hernia"].train_pos


def test_asking_for_a_no_finding_label_or_bad_numbers_is_a_clear_error():
    index = make_index({"hernia": (30, 8)}, NO_FINDING_ROWS)
    with pytest.raises(TaskError, match="diseases names 'No Finding', a no-finding label .*never a task"):
        build_task_pool(index, diseases=["No Finding"])
    with pytest.raises(TaskError, match="force_include names 'NaN', a no-finding label"):
        build_task_pool(index, force_include=["NaN"])
    only_normal = make_index({}, NO_FINDING_ROWS)
    with pytest.raises(TaskError, match="exactly one label other than the no-finding labels"):
        build_task_pool(only_normal)
    for name, value, valid in (("min_train", 0, "an integer >= 1"), ("min_val", "6", "an integer >= 1"),
                               ("max_train_neg", -5, r"an integer >= 1 or None \(no cap\)"),
                               ("seed", -1, "an integer >= 0")):
        with pytest.raises(TaskError, match=rf"task pool option {name} = {value!r} is not valid: use {valid}"):
            build_task_pool(index, **{name: value})


def test_negative_caps_are_seeded_and_respected():
    a = build_task_pool(make_index(COUNTS), exclude={"normal"}, max_train_neg=50, max_val_neg=10, seed=3)
    b = build_task_pool(make_index(COUNTS), exclude={"normal"}, max_train_neg=50, max_val_neg=10, seed=3)
    assert len(a.tasks["hernia"].train_neg) == 50 and len(a.tasks["hernia"].test_neg) == 10
    assert a.tasks["hernia"].train_neg == b.tasks["hernia"].train_neg


def test_episodes_follow_the_protocol():
    pool = build_task_pool(make_index(COUNTS), exclude={"normal"})
    eps = sample_episodes(pool, shots=(1, 5, 10), trials=3)
    assert len(eps) == len(pool.diseases) * 3 * 3
    row = eps[(eps.disease == "hernia") & (eps.shots == 5) & (eps.trial == 2)].iloc[0]
    assert row.seed == 44 and row.n == 5
    assert row.train_labels == [1] * 5 + [0] * 5
    task = pool.tasks["hernia"]
    assert set(row.train_ids[:5]) <= set(task.train_pos) and set(row.train_ids[5:]) <= set(task.train_neg)
    # test = every validation positive plus as many sampled negatives
    assert row.test_ids[:8] == task.test_pos and len(row.test_ids) == 16
    assert set(row.test_ids[8:]) <= set(task.test_neg)
    # the same trial seed draws the same episode; another trial draws another
    again = sample_episodes(pool, shots=(5,), trials=3)
    same = again[(again.disease == "hernia") & (again.trial == 2)].iloc[0]
    assert same.train_ids == row.train_ids
    other = eps[(eps.disease == "hernia") & (eps.shots == 5) & (eps.trial == 1)].iloc[0]
    assert other.train_ids != row.train_ids


def test_shots_beyond_the_pool_are_capped_with_a_warning_or_refused_in_strict_mode():
    pool = build_task_pool(make_index(COUNTS), exclude={"normal"}, force_include={"fibrosis"})
    with pytest.warns(ShotsCappedWarning, match="'fibrosis': 10 shots requested .* 4 positives"):
        eps = sample_episodes(pool, shots=(10,), trials=2, diseases=["fibrosis"])
    assert set(eps.n) == {4}
    with pytest.raises(TaskError, match="'fibrosis': 10 shots requested"):
        sample_episodes(pool, shots=(10,), trials=2, diseases=["fibrosis"], strict=True)


def test_requesting_a_disease_with_too_few_positives_is_a_clear_error():
    with pytest.raises(TaskError, match="'rare' has 14 training and 6 evaluation positives"):
        build_task_pool(make_index(COUNTS), diseases=["rare"])
    with pytest.raises(TaskError, match="'typo' has no single-label image"):
        build_task_pool(make_index(COUNTS), diseases=["typo"])


def test_a_patient_in_train_and_test_is_refused():
    pool = build_task_pool(make_index(COUNTS), exclude={"normal"})
    leaked = pool.tasks["hernia"].test_pos[0]
    pool.patient_of[leaked] = pool.patient_of[pool.tasks["hernia"].train_pos[0]]
    pool.tasks["hernia"].train_pos = pool.tasks["hernia"].train_pos[:1]
    with pytest.raises(TaskError, match="both training and test"):
        sample_episodes(pool, shots=(1,), trials=1, diseases=["hernia"])


def test_a_task_without_test_positives_is_refused():
    pool = build_task_pool(make_index(COUNTS), exclude={"normal"})
    pool.tasks["mass"].test_pos = []
    with pytest.raises(TaskError, match="'mass' has no evaluation positives"):
        sample_episodes(pool, shots=(1,), trials=1)


def test_episodes_round_trip_through_parquet(tmp_path):
    pool = build_task_pool(make_index(COUNTS), exclude={"normal"})
    eps = sample_episodes(pool, shots=(1, 5), trials=2)
    path = save_episodes(eps, tmp_path / "episodes.parquet")
    back = load_episodes(path)
    pd.testing.assert_frame_equal(back.reset_index(drop=True), eps.reset_index(drop=True), check_dtype=False)
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_missing_episodes_names_the_file(tmp_path):
    with pytest.raises(TaskError, match="episodes file .*nope.parquet does not exist"):
        load_episodes(tmp_path / "nope.parquet")


def test_all_test_negatives_keeps_the_training_draw_and_tests_on_every_held_out_negative():
    pool = build_task_pool(make_index(COUNTS), exclude={"normal"})
    matched = sample_episodes(pool, shots=(5,), trials=2)
    every = sample_episodes(pool, shots=(5,), trials=2, test_negatives="all")
    for (_, a), (_, b) in zip(matched.iterrows(), every.iterrows()):
        task = pool.tasks[a.disease]
        assert a.train_ids == b.train_ids  # same training episodes: results stay comparable
        assert sorted(b.test_ids) == sorted(task.test_pos + task.test_neg)
        assert b.test_labels == [1] * len(task.test_pos) + [0] * len(task.test_neg)
    with pytest.raises(TaskError, match="test_negatives = 'some'"):
        sample_episodes(pool, shots=(5,), test_negatives="some")


def test_report_split_is_patient_disjoint_balanced_per_finding_and_fixed():
    from cxrtune.data.tasks import split_for_report

    # patients with two evaluation images (a finding and a follow-up without it) as well as one-image ones
    extra = [{"image_id": f"{pid}-b.png", "patient_id": pid, "labels": ["normal"], "view": "PA", "split": "val",
              "path": ""} for pid in ("her-val-0", "mas-val-1", "rar-val-2")]
    pool = build_task_pool(make_index(COUNTS, extra), exclude={"normal"}, force_include={"fibrosis"}, min_train=1,
                           min_val=1)
    validation, report, kept = split_for_report(pool)
    assert sorted(validation.tasks) == sorted(pool.tasks) and kept == []
    patients = [{pool.patient_of[i] for t in half.tasks.values() for i in t.test_pos + t.test_neg}
                for half in (validation, report)]
    assert patients[0] and patients[1] and not patients[0] & patients[1]  # patient-disjoint
    for name, task in pool.tasks.items():
        a, b = validation.tasks[name], report.tasks[name]
        assert sorted(a.test_pos + b.test_pos) == sorted(task.test_pos)  # nothing lost, nothing doubled
        assert sorted(a.test_neg + b.test_neg) == sorted(task.test_neg)
        assert abs(len(a.test_pos) - len(b.test_pos)) <= 1  # each finding's positives split evenly
        assert a.train_pos == b.train_pos == task.train_pos  # the training pools are shared
    again = split_for_report(pool)
    assert {n: t.test_pos for n, t in again[1].tasks.items()} == {n: t.test_pos for n, t in report.tasks.items()}
    other = split_for_report(pool, salt="another archive")
    assert {n: t.test_pos for n, t in other[1].tasks.items()} != {n: t.test_pos for n, t in report.tasks.items()}


def test_a_finding_with_one_evaluation_patient_is_validated_only():
    from cxrtune.data.tasks import split_for_report

    pool = build_task_pool(make_index({**COUNTS, "single": (20, 1)}), exclude={"normal"}, min_train=1, min_val=1)
    validation, report, kept = split_for_report(pool)
    assert kept == ["single"] and "single" in validation.tasks and "single" not in report.tasks
    assert validation.tasks["single"].test_pos == pool.tasks["single"].test_pos
    assert set(report.tasks) == set(pool.tasks) - {"single"}
