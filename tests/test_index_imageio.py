"""The index schema and the study's decode rule (min-max, quantise, then Lanczos)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrtune.data.imageio import array_to_square_uint8, load_grey_square
from cxrtune.data.index import patient_split, read_index, read_index_metadata, validate_index, write_index
from cxrtune.errors import DataError


def _row(i, patient, split="train", labels=("A",)):
    return {"image_id": f"{i}.png", "patient_id": patient, "labels": list(labels), "view": "PA",
            "split": split, "path": f"/x/{i}.png"}


def test_index_round_trip_keeps_labels_and_metadata(tmp_path):
    df = validate_index(pd.DataFrame([_row(1, "p1", labels=("A", "B")), _row(2, "p2", "val", ())]))
    path = write_index(df, tmp_path / "index.parquet", {"source": "test", "root": "/x"})
    back = read_index(path)
    assert back["labels"].tolist() == [["A", "B"], []]
    assert read_index_metadata(path) == {"source": "test", "root": "/x"}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([_row(1, "p1"), _row(1, "p2")], "image_id '1.png' occurs more than once"),
        ([_row(1, "p1", "train"), _row(2, "p1", "val")], "patient 'p1' appears in more than one split"),
        ([_row(1, "p1", "holdout")], r"split value\(s\) \['holdout'\]"),
    ],
)
def test_index_invariants_are_enforced(rows, message):
    with pytest.raises(DataError, match=message):
        validate_index(pd.DataFrame(rows))


def test_missing_columns_are_named():
    with pytest.raises(DataError, match=r"lacks column\(s\) \['split'"):
        validate_index(pd.DataFrame([{k: v for k, v in _row(1, "p").items() if k != "split"}]))


def test_patient_split_is_the_md5_rule():
    import hashlib

    ids = [str(i) for i in range(500)]
    expected = ["val" if int(hashlib.md5(i.encode()).hexdigest(), 16) % 5 == 0 else "train" for i in ids]
    assert [patient_split(i) for i in ids] == expected
    assert 0.15 < expected.count("val") / len(ids) < 0.25


def test_sixteen_bit_values_are_min_max_normalised_before_quantising(tmp_path):
    raw = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "a.png")
    out = load_grey_square(tmp_path / "a.png", 64)
    # full range used: a plain 8-bit conversion would clip everything above 255
    assert out.min() == 0 and out.max() == 255
    expected = np.rint((raw - 1000) / 4000 * 255).astype(np.uint8)
    assert np.array_equal(out, expected)


def test_rgb_and_rgba_reduce_to_luma_and_ignore_alpha(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    rgb = np.stack([grey] * 3, axis=-1)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)], axis=-1)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    g = load_grey_square(tmp_path / "g.png", 32)
    assert np.array_equal(load_grey_square(tmp_path / "rgb.png", 32), g)
    assert np.array_equal(load_grey_square(tmp_path / "rgba.png", 32), g)


def test_fit_modes_and_lanczos_resize():
    img = np.zeros((40, 80), dtype=np.uint8)
    img[:, 20:60] = 255  # the central square is white
    crop = array_to_square_uint8(img, 40, fit="crop")
    assert crop.shape == (40, 40) and crop.min() == 255
    pad = array_to_square_uint8(img, 80, fit="pad")
    assert pad.shape == (80, 80) and pad[:20].max() == 0
    small = array_to_square_uint8(np.tile(np.arange(256, dtype=np.uint8), (256, 1)), 64)
    assert small.shape == (64, 64) and np.all(np.diff(small[0].astype(int)) >= 0)
    with pytest.raises(DataError, match="fit = 'zoom'"):
        array_to_square_uint8(img, 40, fit="zoom")


def test_constant_image_decodes_to_black_instead_of_dividing_by_zero():
    assert array_to_square_uint8(np.full((8, 8), 7, np.uint16), 8).max() == 0


def test_corrupt_and_missing_files_are_data_errors_naming_the_file(tmp_path):
    good = tmp_path / "ok.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(good)
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DataError, match="truncated.png could not be decoded"):
        load_grey_square(bad, 16)
    with pytest.raises(DataError, match="nothere.png does not exist"):
        load_grey_square(tmp_path / "nothere.png", 16)


@pytest.mark.parametrize("dtype, high", [(np.uint8, 255), (np.uint16, 65535), (np.int16, 3000)])
def test_lookup_table_path_equals_the_float_rule(dtype, high):
    from cxrtune.data.imageio import quantise, quantise_integer_grey, to_unit_grey

    rng = np.random.default_rng(1)
    low = -1000 if dtype == np.int16 else 3
    raw = rng.integers(low, high, (50, 70)).astype(dtype)
    assert np.array_equal(quantise_integer_grey(raw), quantise(to_unit_grey(raw)))
