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


def test_clinical_correlates_shift_the_patient(base, monkeypatch):
    """A finding's correlates (render.CORRELATES) change the patient it is drawn on, in the
    direction the table says and more at higher severity; normal patients and findings without a
    correlate are untouched; scale 0 restores the uncorrelated patient."""
    from cxrtune.data.phantom import render

    plain = make_patient(base, SIZE, 5)
    assert make_patient(base, SIZE, 5, finding="normal", severity=1.0).params == plain.params
    assert make_patient(base, SIZE, 5, finding="fibrotic band", severity=1.0).params == plain.params
    mild = make_patient(base, SIZE, 5, finding="pulmonary fibrosis", severity=0.0).params
    severe = make_patient(base, SIZE, 5, finding="pulmonary fibrosis", severity=1.0).params
    assert severe.lung_height == pytest.approx(plain.params.lung_height - 0.12)
    assert plain.params.lung_height > mild.lung_height > severe.lung_height
    assert severe.habitus_x == plain.params.habitus_x  # only the table's parameters move
    # Restrictive disease: fewer lung pixels in the image of the same patient.
    fib = make_patient(base, SIZE, 5, finding="pulmonary fibrosis", severity=1.0)
    assert (fib.lung > 0.45 * plain.lung.max()).sum() < (plain.lung > 0.45 * plain.lung.max()).sum()
    hernia = make_patient(base, SIZE, 5, finding="hiatal hernia", severity=0.5).params
    assert hernia.soft_tissue == pytest.approx(plain.params.soft_tissue + 0.15 * 0.7)
    monkeypatch.setattr(render, "CORRELATE_SCALE", 0.0)
    assert make_patient(base, SIZE, 5, finding="pulmonary fibrosis", severity=1.0).params == plain.params


def test_renderer_draws_each_row_on_its_findings_patient(base):
    """Every study of a patient (rows share patient_seed) gets the same correlated patient; the
    renderer keys patients by finding and severity too, so a cached normal patient is never reused
    for a sick row with the same seed."""
    import pandas as pd

    from cxrtune.data.phantom.builder import Renderer

    rows = pd.DataFrame([
        {"anatomy": 0, "patient_seed": 5, "study_seed": 1, "finding": "normal", "severity": 0.0, "finding_seed": 0},
        {"anatomy": 0, "patient_seed": 5, "study_seed": 2, "finding": "hiatal hernia", "severity": 0.9,
         "finding_seed": 4},
        {"anatomy": 0, "patient_seed": 5, "study_seed": 3, "finding": "hiatal hernia", "severity": 0.9,
         "finding_seed": 4},
    ])
    r = Renderer((base,))
    normal, sick, sick2 = (r.of(row, SIZE) for row in rows.itertuples(index=False))
    assert normal.params == make_patient(base, SIZE, 5).params
    assert sick is sick2
    assert sick.params == make_patient(base, SIZE, 5, finding="hiatal hernia", severity=0.9).params
    assert sick.params.soft_tissue > normal.params.soft_tissue
    img = r.render(next(rows.iloc[[1]].itertuples(index=False)), SIZE)
    expected = render_study(sick, 2, make_finding("hiatal hernia", sick, 4, 0.9).delta)[0]
    assert img.tobytes() == expected.tobytes()


def test_correlates_table_names_real_findings_and_parameters():
    """A typo in the table would silently drop a correlate: every key must be a finding and every
    shifted name a PatientParams field."""
    import dataclasses

    from cxrtune.data.phantom.render import CORRELATES, PatientParams

    fields = {f.name for f in dataclasses.fields(PatientParams)}
    assert set(CORRELATES) <= set(FINDINGS)
    for finding, shifts in CORRELATES.items():
        assert shifts and set(shifts) <= fields, finding
