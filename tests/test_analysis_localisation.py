"""Pointing game, energy share, boxes and NIH BBox_List_2017 mapping, by hand-worked cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _analysis_fixtures import FakeCache
from cxrtune.analysis.ground_truth import GroundTruth, read_nih_boxes, to_cache_box
from cxrtune.analysis.localisation import boxes_to_mask, energy_inside, pointing_hit, score_images, summarise_scores
from cxrtune.errors import DataError


def _mask():
    mask = np.zeros((16, 16), bool)
    mask[4:8, 10:14] = True
    return mask


def test_pointing_game_hits_when_the_maximum_is_inside_and_misses_when_outside():
    heat = np.random.default_rng(0).random((16, 16)) * 0.5
    inside, outside = heat.copy(), heat.copy()
    inside[5, 11] = 1.0
    outside[12, 2] = 1.0
    assert pointing_hit(inside, _mask()) is True
    assert pointing_hit(outside, _mask()) is False


def test_energy_inside_is_the_share_of_the_heatmap_in_the_mask():
    heat = np.zeros((16, 16))
    heat[5, 11] = 3.0  # inside
    heat[0, 0] = 1.0  # outside
    heat[1, 1] = -5.0  # negative evidence does not count
    assert energy_inside(heat, _mask()) == pytest.approx(0.75)
    assert energy_inside(np.ones((16, 16)), _mask()) == pytest.approx(16 / 256)  # uniform: the area share
    with pytest.raises(DataError, match="same shape"):
        energy_inside(np.ones((8, 8)), _mask())
    with pytest.raises(DataError, match="empty"):
        pointing_hit(np.ones((16, 16)), np.zeros((16, 16), bool))


def test_scores_summarise_per_finding_and_backbone_with_cis():
    mask = _mask()
    hit, miss = np.zeros((16, 16)), np.zeros((16, 16))
    hit[6, 12] = 1
    miss[0, 0] = 1
    frame = score_images(np.stack([hit, hit, hit, miss]), np.stack([mask] * 4))
    frame["finding"], frame["backbone"] = "mass", "moco"
    summary = summarise_scores(frame).iloc[0]
    assert summary["hit_rate"] == pytest.approx(0.75) and summary["images"] == 4
    assert summary["energy"] == pytest.approx(0.75)
    assert 0 <= summary["hit_ci_low"] <= 0.75 <= summary["hit_ci_high"] <= 1
    assert summary["chance"] == pytest.approx(16 / 256)


def test_boxes_become_masks_of_the_pixels_whose_centres_they_cover():
    mask = boxes_to_mask([(0.25, 0.5, 0.5, 0.75)], 8)
    expected = np.zeros((8, 8), bool)
    expected[4:6, 2:4] = True
    assert (mask == expected).all()
    with pytest.raises(DataError, match="empty or inverted"):
        boxes_to_mask([(0.5, 0.5, 0.4, 0.6)], 8)


def test_nih_boxes_are_read_from_the_official_csv_layout_and_mapped_through_the_centre_crop(tmp_path):
    csv = tmp_path / "BBox_List_2017.csv"
    csv.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                   "00000001_000.png,Infiltrate,256,512,128,64,,,\n"
                   "00000002_000.png,Mass,100,100,50,50,,,\n"
                   "00009999_000.png,Mass,100,100,50,50,,,\n")
    boxes = read_nih_boxes(csv)
    assert list(boxes["finding"]) == ["Infiltration", "Mass", "Mass"]  # the file's name for Infiltration
    # a 1024 x 1024 image: no crop, the box scales by 1/1024
    assert to_cache_box(256, 512, 128, 64, 1024, 1024) == (0.25, 0.5, 0.375, 0.5625)
    # a 1200 wide x 1000 high image: the crop drops 100 px on each side
    assert to_cache_box(100, 100, 50, 50, 1200, 1000) == (0.0, 0.1, 0.05, 0.15)
    index = pd.DataFrame({"image_id": ["00000001_000.png", "00000002_000.png"], "original_width": [1024, 1200],
                          "original_height": [1024, 1000]})
    truth = GroundTruth(FakeCache(tmp_path, index, 16), boxes_csv=csv)
    mask = truth.mask("00000001_000.png", "Infiltration")
    expected = np.zeros((16, 16), bool)
    expected[8:9, 4:6] = True  # rows 8 to 9 (y 0.5-0.5625 of 16 px), columns 4-6
    assert (mask == expected).all()
    assert truth.mask("00000001_000.png", "Mass") is None


def test_a_broken_box_file_is_refused_with_its_row(tmp_path):
    csv = tmp_path / "BBox_List_2017.csv"
    csv.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Mass,1,2,,4,,,\n")
    with pytest.raises(DataError, match="row 2"):
        read_nih_boxes(csv)
    with pytest.raises(DataError, match="does not exist"):
        read_nih_boxes(tmp_path / "missing.csv")


def test_the_box_file_is_found_in_the_nih_root_the_cache_was_built_from(tmp_path):
    from cxrtune.analysis.sections import default_boxes as _default_boxes

    cache = FakeCache(tmp_path, pd.DataFrame({"image_id": ["a.png"]}), 16)
    cache.report = {"source": {"source": "nih", "root": str(tmp_path)}}
    assert _default_boxes(cache) is None  # the root has no box file
    (tmp_path / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    assert _default_boxes(cache) == str(tmp_path / "BBox_List_2017.csv")
