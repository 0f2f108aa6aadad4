"""Rendering: determinism, variety, findings' masks inside the body and the right organ."""

from __future__ import annotations

import numpy as np
import pytest

from _phantom_fixtures import write_procedural_ct
from cxrtune.data.phantom.ct import load_ct
from cxrtune.data.phantom.findings import FINDINGS, ORGAN, boxes_of, make_finding
from cxrtune.data.phantom.render import BaseAnatomy, Bilinear, make_patient, pose_mask, render_study
from cxrtune.data.phantom.segment import project
from scipy import ndimage as ndi

SIZE = 96


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = write_procedural_ct(tmp_path_factory.mktemp("ct") / "p.nii.gz")
    layers = project(load_ct(path))
    return BaseAnatomy.from_layers(layers.as_dict())


def test_same_seeds_same_bytes_any_order(base):
    a = [render_study(make_patient(base, SIZE, p), s)[0] for p, s in [(1, 10), (2, 20), (1, 11)]]
    b = [render_study(make_patient(base, SIZE, p), s)[0] for p, s in [(1, 11), (2, 20), (1, 10)]]
    assert a[0].tobytes() == b[2].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2].tobytes() == b[0].tobytes()
    assert a[0].dtype == np.uint8 and a[0].shape == (SIZE, SIZE)
    assert a[0].tobytes() != a[2].tobytes()  # another study of the same patient differs
    assert a[0].tobytes() != a[1].tobytes()


def test_patients_differ_more_than_studies(base):
    """Between-patient variety must dominate within-patient (study) variety."""
    imgs = {(p, s): render_study(make_patient(base, SIZE, p), 100 * p + s)[0].astype(float) for p in range(6) for s in range(2)}
    within = np.mean([np.abs(imgs[(p, 0)] - imgs[(p, 1)]).mean() for p in range(6)])
    between = np.mean([np.abs(imgs[(p, 0)] - imgs[(q, 0)]).mean() for p in range(6) for q in range(p + 1, 6)])
    assert between > within


def test_bilinear_matches_scipy():
    rng = np.random.default_rng(0)
    img = rng.random((20, 20)).astype(np.float32)
    r = rng.uniform(0, 19, (7, 9))
    c = rng.uniform(0, 19, (7, 9))
    ours = Bilinear(r, c, 20)(img)
    ref = ndi.map_coordinates(img, [r, c], order=1)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("name", FINDINGS)
def test_finding_mask_in_body_and_organ(base, name):
    p = make_patient(base, SIZE, 7, light=True)
    eff = make_finding(name, p, seed=3, severity=0.8)
    assert eff.mask.any(), name
    assert np.abs(eff.delta).max() > 0
    organ = {
        "lung": p.lung > 0,
        "rib": ndi.binary_dilation(p.rib > 0, iterations=2),
        "retrocardiac": ndi.binary_dilation(p.heart > 0.5, iterations=max(2, SIZE // 16)),
    }[ORGAN[name]]
    assert (eff.mask & ~(p.body > 0)).sum() == 0
    assert (eff.mask & ~organ).sum() <= 0.02 * eff.mask.sum(), name
    # The finding changes the image where its mask is.
    posed = pose_mask(p, 5, eff.mask)
    full = make_patient(base, SIZE, 7)
    with_f = render_study(full, 5, eff.delta)[0].astype(int)
    without = render_study(full, 5)[0].astype(int)
    changed = np.abs(with_f - without) > 0
    assert changed[posed].mean() > changed[~posed].mean()


def test_findings_are_deterministic_and_severity_grows(base):
    p = make_patient(base, SIZE, 9)
    a = make_finding("pulmonary mass", p, 4, 0.3)
    b = make_finding("pulmonary mass", p, 4, 0.3)
    assert np.array_equal(a.delta, b.delta) and np.array_equal(a.mask, b.mask)
    big = make_finding("pulmonary mass", p, 4, 0.9)
    assert big.mask.sum() > a.mask.sum()


def test_boxes_hand_worked():
    m = np.zeros((10, 10), bool)
    m[2:4, 1:3] = True
    assert boxes_of(m) == [(0.1, 0.2, 0.3, 0.4)]
    m[5:9, 7:10] = True
    both = boxes_of(m, mid_col=0.5)
    assert both == [(0.1, 0.2, 0.3, 0.4), (0.7, 0.5, 1.0, 0.9)]
    assert boxes_of(np.zeros((4, 4), bool)) == []
