"""The phantom as a source: index, labels and patients, rendering by row, masks beside the cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _phantom_fixtures import phantom_env
from cxrtune.data.phantom.findings import FINDINGS, NORMAL
from cxrtune.data.sources import make_source
from cxrtune.errors import ConfigError

SMALL = dict(n_pretrain=60, studies_per_patient=3, prevalence=0.05, train_pos=4, val_pos=2, train_neg=10,
             val_neg=6, seed=3)


@pytest.fixture()
def source(monkeypatch, tmp_path):
    phantom_env(monkeypatch, tmp_path)
    return make_source("phantom", **SMALL)


def test_index_labels_patients_and_splits(source):
    df = source.build_index()
    assert set(df["subset"]) == {"pretrain", "fewshot"}
    assert (df["path"] == "").all()
    # Labels: one per image, the finding or "normal", and they agree with the render parameters.
    assert df["labels"].map(len).eq(1).all()
    assert (df["labels"].map(lambda v: v[0]) == df["finding"]).all()
    assert set(df["finding"]) <= set(FINDINGS) | {NORMAL}
    # A patient has one finding (in every study), one subset and one split.
    per_patient = df.groupby("patient_id").agg({"finding": "nunique", "subset": "nunique", "split": "nunique",
                                                "patient_seed": "nunique"})
    assert (per_patient == 1).all().all()
    # Pretraining patients are not in the few-shot pool, and the pool's splits are patient-disjoint.
    pre = set(df.loc[df["subset"] == "pretrain", "patient_id"])
    few = df[df["subset"] == "fewshot"]
    assert pre.isdisjoint(few["patient_id"])
    assert set(few.loc[few["split"] == "train", "patient_id"]).isdisjoint(few.loc[few["split"] == "val", "patient_id"])
    # Counts: the requested positives per finding and negatives.
    counts = few.groupby(["split", "finding"]).size()
    for f in FINDINGS:
        assert counts[("train", f)] >= SMALL["train_pos"] and counts[("val", f)] >= SMALL["val_pos"]
    assert counts[("train", NORMAL)] >= SMALL["train_neg"] and counts[("val", NORMAL)] >= SMALL["val_neg"]
    assert (df.loc[df["subset"] == "pretrain"].shape[0]) == SMALL["n_pretrain"]
    # Rows come grouped by patient (consecutive rows reuse a patient's layers).
    changes = (df["patient_id"] != df["patient_id"].shift()).sum()
    assert changes == df["patient_id"].nunique()
    # Boxes: present and inside [0, 1] for positives, missing for normals.
    pos = df[df["finding"] != NORMAL]
    assert pos[["box_x0", "box_y0", "box_x1", "box_y1"]].notna().all().all()
    assert ((pos["box_x0"] < pos["box_x1"]) & (pos["box_y0"] < pos["box_y1"])).all()
    assert pos[["box_x0", "box_y0", "box_x1", "box_y1"]].stack().between(0, 1).all()
    assert df.loc[df["finding"] == NORMAL, "box_x0"].isna().all()


def test_same_seed_same_index_and_bytes(source, monkeypatch, tmp_path):
    df = source.build_index()
    rows = df.iloc[[0, 5, len(df) - 1, 17]]
    a = source.read_images(rows, 64)
    b = source.read_images(rows.iloc[::-1], 64)[::-1]
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert all(x.dtype == np.uint8 and x.shape == (64, 64) for x in a)
    # A fresh source (another process would do the same) builds the same index and pixels.
    other = make_source("phantom", **SMALL)
    pd.testing.assert_frame_equal(other.build_index(), df)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(other.read_images(rows, 64), a))
    changed = make_source("phantom", **{**SMALL, "seed": 4}).build_index()
    assert not changed["patient_seed"].equals(df["patient_seed"])


def test_task_pool_uses_the_fewshot_pool(source):
    df = source.build_index()
    pool = source.task_pool(df)
    assert sorted(pool.diseases) == sorted(FINDINGS)
    few_ids = set(df.loc[df["subset"] == "fewshot", "image_id"])
    for task in pool.tasks.values():
        assert set(task.train_pos + task.train_neg + task.test_pos + task.test_neg) <= few_ids
        assert len(task.train_pos) >= SMALL["train_pos"]


def test_bad_option_is_named(monkeypatch, tmp_path):
    phantom_env(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match="prevalence"):
        make_source("phantom", prevalence=0.5)
    with pytest.raises(ConfigError, match="n_pretrian"):
        make_source("phantom", n_pretrian=5)


def test_cache_masks_match_boxes(source, tmp_path):
    from cxrtune.data.cache import build_cache
    from cxrtune.data.phantom.builder import BOX_SIZE
    from cxrtune.data.sources.phantom import load_masks

    size = BOX_SIZE  # the index's boxes are computed at this size
    cache = build_cache(source, size=size, workers=1, progress=False, cache_dir=tmp_path / "c")
    index = cache.index
    masks = load_masks(cache)
    assert masks.shape == (len(index), size, size)
    normal = (index["finding"] == NORMAL).to_numpy()
    assert not masks[normal].any()
    assert masks[~normal].reshape((~normal).sum(), -1).any(axis=1).all()
    # The cached pixels are the rendered ones.
    direct = source.read_images(index.iloc[:3], size)
    assert all(np.array_equal(cache.images[i], direct[i]) for i in range(3))
    # Each mask's bounding box is the index's union box.
    for i in np.nonzero(~normal)[0]:
        rows, cols = np.nonzero(masks[i])
        row = index.iloc[i]
        got = (cols.min() / size, rows.min() / size, (cols.max() + 1) / size, (rows.max() + 1) / size)
        assert got == pytest.approx((row["box_x0"], row["box_y0"], row["box_x1"], row["box_y1"]))
    first = int(np.nonzero(~normal)[0][0])
    assert np.array_equal(load_masks(cache, rows=np.array([first]))[0], masks[first])
