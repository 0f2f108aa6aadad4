"""Ten synthetic findings that mirror the study's rare PadChest diseases.

Each finding is a change of attenuation placed in 3D where the disease occurs and projected
analytically (chord lengths of spheres and ellipsoids, or a lung-weighted texture, which is the
projection of a texture filling the lung's depth). A point drawn uniformly in a 3D lung projects
to a pixel with probability proportional to the lung's thickness there, so centres are drawn on
the warped lung-thickness map with that weight, and each lesion is kept inside the lung's depth
(its chord is clipped to the lung thickness it replaces).

Every finding has a severity in (0, 1]: drawn from a Beta distribution skewed to subtle cases
(many subtle, few obvious, as in real archives), it sets size, density or extent. A finding
returns the projected change (mm of water, added to the anterior group), its mask in the
patient's image coordinates, and the organ the mask must lie in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from cxrtune.data.phantom.render import Patient, bandpass_noise, blur, sample
from cxrtune.data.phantom.segment import FOV_MM

FINDINGS = (
    "calcified granuloma",
    "interstitial pattern",
    "callus rib fracture",
    "hiatal hernia",
    "hemidiaphragm elevation",
    "bronchiectasis",
    "fibrotic band",
    "reticular interstitial pattern",
    "pulmonary mass",
    "pulmonary fibrosis",
)
NORMAL = "normal"
#: Organ each finding's mask must lie in (checked by the tests).
ORGAN = {
    "calcified granuloma": "lung", "interstitial pattern": "lung", "callus rib fracture": "rib",
    "hiatal hernia": "retrocardiac", "hemidiaphragm elevation": "lung", "bronchiectasis": "lung",
    "fibrotic band": "lung", "reticular interstitial pattern": "lung", "pulmonary mass": "lung",
    "pulmonary fibrosis": "lung",
}
#: Beta(a, b) of each finding's severity: most cases subtle, a few obvious.
SEVERITY_BETA = {name: (1.0, 1.3) for name in FINDINGS}
#: 1 - lung density: what a lesion adds where it replaces aerated lung (per mm).
LUNG_GAIN = 0.85
#: Ground-glass density (mm water at the lung's full depth) of a diffuse finding at severity 0.5.
HAZE_MM = 12.0


@dataclass
class FindingEffect:
    delta: np.ndarray   # projected attenuation change (mm water), patient coordinates
    mask: np.ndarray    # bool, patient coordinates


def _grid(size: int):
    g = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(g, g, indexing="ij")


def lung_field(p: Patient, frac: float = 0.45) -> np.ndarray:
    return p.lung >= frac * max(float(p.lung.max()), 1e-6)


#: Findings are placed on a fixed grid of cells (centres), so that the same row puts its finding
#: at the same place at every image size (the index's boxes hold for any cache size).
PLACEMENT_GRID = 48


def _pick(rng: np.random.Generator, weight: np.ndarray) -> tuple[float, float]:
    """A position drawn with probability proportional to ``weight`` (sampled at the centres of a
    PLACEMENT_GRID x PLACEMENT_GRID grid, whatever the image size); returns (row, col) in pixel
    units of ``weight`` (pixel i spans [i, i + 1))."""
    n = weight.shape[0]
    g = PLACEMENT_GRID
    centres = (np.arange(g) + 0.5) / g
    R, C = np.meshgrid(centres, centres, indexing="ij")
    coarse = np.clip(sample(weight.astype(np.float32), R, C), 0.0, None).ravel().astype(np.float64)
    total = coarse.sum()
    u = rng.random()
    if total <= 0:
        return n / 2, n / 2
    i = int(np.searchsorted(np.cumsum(coarse) / total, u, side="right"))
    r, c = divmod(min(i, coarse.size - 1), g)
    return (r + 0.5) / g * n, (c + 0.5) / g * n


def _ellipse_chord(size: int, r0: float, c0: float, a_px: float, b_px: float, theta: float,
                   depth_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Chord length (mm) through an ellipsoid with in-plane semi-axes a (along theta) and b (px)
    and depth semi-axis ``depth_mm``; returns (chord, footprint mask). Only the ellipse's
    bounding window is evaluated."""
    chord = np.zeros((size, size), np.float32)
    foot = np.zeros((size, size), bool)
    a_px, b_px = max(a_px, 0.75), max(b_px, 0.75)  # at least one pixel wide
    reach = max(a_px, b_px) + 1.0
    r_lo, r_hi = max(int(r0 - reach), 0), min(int(np.ceil(r0 + reach)) + 1, size)
    c_lo, c_hi = max(int(c0 - reach), 0), min(int(np.ceil(c0 + reach)) + 1, size)
    if r_lo >= r_hi or c_lo >= c_hi:
        return chord, foot
    R, C = np.meshgrid(np.arange(r_lo, r_hi, dtype=np.float32) + 0.5,
                       np.arange(c_lo, c_hi, dtype=np.float32) + 0.5, indexing="ij")
    dr, dc = R - r0, C - c0
    u = dc * np.cos(theta) + dr * np.sin(theta)
    v = -dc * np.sin(theta) + dr * np.cos(theta)
    q = (u / a_px) ** 2 + (v / b_px) ** 2
    chord[r_lo:r_hi, c_lo:c_hi] = 2.0 * depth_mm * np.sqrt(np.clip(1.0 - q, 0.0, None))
    foot[r_lo:r_hi, c_lo:c_hi] = q <= 1.0
    return chord, foot


def _mm(p: Patient) -> float:
    """Pixels per mm at this image size."""
    return p.size / FOV_MM


def _in_lung(p: Patient, chord: np.ndarray) -> np.ndarray:
    """A lesion replaces lung: its chord cannot exceed the lung thickness along the ray."""
    return np.minimum(chord, p.lung) * LUNG_GAIN


def _lung_centre(p: Patient, rng: np.random.Generator, radius_px: float, zone=None) -> tuple[int, int]:
    """A centre drawn with weight lung thickness, inside the lung field shrunk by most of the
    lesion's radius (and inside ``zone`` when given), relaxing these limits when nothing is left."""
    field = lung_field(p)
    steps = int(min(radius_px * 0.8, p.size / 16))
    inner = ndi.binary_erosion(field, iterations=steps) if steps >= 1 else field
    zone = np.ones_like(p.lung) if zone is None else zone
    for region in (inner * zone, field * zone, field):
        weight = p.lung * region
        if weight.sum() > 0:
            return _pick(rng, weight)
    return _pick(rng, p.lung)


def calcified_granuloma(p: Patient, rng, s: float) -> FindingEffect:
    k = _mm(p)
    radius_mm = 4.5 + 7.5 * s
    r0, c0 = _lung_centre(p, rng, radius_mm * k)
    chord, foot = _ellipse_chord(p.size, r0, c0, radius_mm * k, radius_mm * k, 0.0, radius_mm)
    density = 3.0 + 3.0 * s  # dense calcium, brighter than the vessels it hides among
    delta = _in_lung(p, chord) + np.minimum(chord, p.lung) * density
    mask = ndi.binary_dilation(foot, iterations=1) & lung_field(p, 0.2)
    return FindingEffect(delta, mask)


def pulmonary_mass(p: Patient, rng, s: float) -> FindingEffect:
    k = _mm(p)
    radius_mm = 18.0 + 32.0 * s
    r0, c0 = _lung_centre(p, rng, radius_mm * k)
    chord = np.zeros((p.size, p.size), np.float32)
    foot = np.zeros((p.size, p.size), bool)
    for j in range(3):  # lobulated: three overlapping spheres
        rr = radius_mm * (1.0 if j == 0 else rng.uniform(0.5, 0.8))
        off = 0 if j == 0 else radius_mm * 0.5 * k
        ang = rng.uniform(0, 2 * np.pi)
        ch, ft = _ellipse_chord(p.size, r0 + off * np.sin(ang), c0 + off * np.cos(ang), rr * k, rr * k, 0.0, rr)
        chord = np.maximum(chord, ch)
        foot |= ft
    delta = _in_lung(p, chord)
    mask = foot & lung_field(p, 0.2)
    return FindingEffect(delta, mask)


def fibrotic_band(p: Patient, rng, s: float) -> FindingEffect:
    k = _mm(p)
    length_mm = 50.0 + 60.0 * s
    thick_mm = 5.0 + 7.0 * s
    zone = _rows_between(p, 0.35, 1.0)
    r0, c0 = _lung_centre(p, rng, 0.25 * length_mm * k, zone)
    theta = rng.uniform(-0.6, 0.6)
    chord, foot = _ellipse_chord(p.size, r0, c0, 0.5 * length_mm * k, 0.5 * thick_mm * k, theta, 25.0 + 30.0 * s)
    delta = _in_lung(p, chord) * 1.6  # scar: denser than the lung it replaces
    mask = ndi.binary_dilation(foot, iterations=1) & lung_field(p, 0.2)
    return FindingEffect(delta, mask)


def callus_rib_fracture(p: Patient, rng, s: float) -> FindingEffect:
    k = _mm(p)
    rib = p.rib
    field = lung_field(p, 0.2)
    C = _grid(p.size)[1]
    lateral = np.abs(C / p.size - p.mid_col) > 0.18
    candidates = (rib > 0.5 * np.percentile(rib[field], 95)) & field & lateral
    weight = candidates.astype(np.float32)
    if not weight.any():
        weight = field.astype(np.float32)
    r0, c0 = _pick(rng, weight)
    smooth = blur(rib, 1.0)
    gr = ndi.sobel(smooth, axis=0)[int(r0), int(c0)]
    gc = ndi.sobel(smooth, axis=1)[int(r0), int(c0)]
    theta = float(np.arctan2(gr, gc)) + np.pi / 2  # along the rib: across its gradient
    length_mm = 28.0 + 24.0 * s
    thick_mm = 14.0 + 12.0 * s
    chord, foot = _ellipse_chord(p.size, r0, c0, 0.5 * length_mm * k, 0.5 * thick_mm * k, theta, 0.5 * thick_mm)
    density = 4.0 + 3.5 * s  # version 6 (was 3 + 3 s: the ceiling CNN reached only 0.82)
    delta = chord * density
    # The fracture line: a thin lucent gap across the callus.
    R, Cc = _grid(p.size)
    along = (Cc - c0) * np.cos(theta) + (R - r0) * np.sin(theta)
    delta = delta * (1.0 - 0.6 * np.exp(-0.5 * (along / max(0.6, 0.6 * k)) ** 2))
    mask = ndi.binary_dilation(foot, iterations=1)
    return FindingEffect(delta.astype(np.float32), mask)


def hiatal_hernia(p: Patient, rng, s: float) -> FindingEffect:
    k = _mm(p)
    a_mm = 22.0 + 30.0 * s
    b_mm = a_mm * rng.uniform(0.7, 0.95)
    r0 = (p.heart_row + 0.55 * (p.dome_row - p.heart_row)) * p.size + rng.uniform(-4, 4) * k
    c0 = (p.mid_col + rng.uniform(0.0, 0.04)) * p.size
    # Behind the heart: no wider than most of the cardiac silhouette.
    a_px = min(a_mm * k, 0.8 * p.heart_halfwidth * p.size)
    b_px = min(b_mm * k, a_px)
    a_mm, b_mm = a_px / k, b_px / k
    chord, foot = _ellipse_chord(p.size, r0, c0, a_px, b_px, 0.0, b_mm)
    tissue = chord * (0.6 + 0.3 * s)
    # Gas cap above an air-fluid level: air replaces tissue (negative change).
    level = r0 - rng.uniform(0.0, 0.5) * b_mm * k
    R, _ = _grid(p.size)
    gas = np.where(R < level, chord, 0.0) * (0.6 + 0.4 * s)
    delta = (tissue - gas).astype(np.float32)
    retrocardiac = ndi.binary_dilation(p.heart > 0.5, iterations=max(2, p.size // 32))
    mask = foot & (p.body > 1.0) & retrocardiac
    return FindingEffect(delta, mask)


def _rewarp_lungs(p: Patient, lift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lung layers with the lung base lifted by ``lift`` (rows, per column, >= 0): rows
    between the apex and the base are compressed toward the apex."""
    size = p.size
    R, C = _grid(size)
    apex = p.apex_row * size
    height = max((p.dome_row - p.apex_row) * size, 8.0)
    factor = height / np.maximum(height - lift[None, :], 4.0)
    r_src = apex + (R - apex) * factor
    coords = [r_src - 0.5, C - 0.5]
    deficit = ndi.map_coordinates(p.lung_deficit, coords, order=1, mode="constant", prefilter=False)
    lung = ndi.map_coordinates(p.lung, coords, order=1, mode="constant", prefilter=False)
    return deficit.astype(np.float32), lung.astype(np.float32)


def hemidiaphragm_elevation(p: Patient, rng, s: float) -> FindingEffect:
    k = _mm(p)
    lift_mm = 15.0 + 55.0 * s
    side_left = rng.random() < 0.5
    C = (np.arange(p.size) + 0.5) / p.size
    on_side = 1.0 / (1.0 + np.exp(-(C - p.mid_col) / 0.015))
    if not side_left:
        on_side = 1.0 - on_side
    deficit, lung = _rewarp_lungs(p, lift_mm * k * on_side)
    delta = p.lung_deficit - deficit  # lung lost is tissue gained
    old = lung_field(p)
    new = lung >= 0.45 * max(float(p.lung.max()), 1e-6)
    side = (p.left > 0.5) if side_left else (p.left <= 0.5)
    mask = old & ~new & side
    return FindingEffect(delta.astype(np.float32), mask)


def _rows_between(p: Patient, lo: float, hi: float) -> np.ndarray:
    """Weight 1 on rows from ``lo`` to ``hi`` of the lung's height (0 = apex, 1 = base)."""
    R = _grid(p.size)[0] / p.size
    t = (R - p.apex_row) / max(p.dome_row - p.apex_row, 1e-3)
    return ((t >= lo) & (t <= hi)).astype(np.float32)


def _peripheral(p: Patient) -> np.ndarray:
    C = _grid(p.size)[1] / p.size
    return np.clip(np.abs(C - p.mid_col) / 0.3, 0.0, 1.0)


def _texture(p: Patient, rng, pattern: np.ndarray, amplitude: float, zone: np.ndarray,
             haze: float = 0.0) -> FindingEffect:
    """A diffuse pattern filling the lung's depth in ``zone``: ``amplitude`` (mm water) times the
    pattern, plus ``haze`` mm of uniform density (the ground-glass component that raises the
    whole zone's opacity)."""
    field = lung_field(p)
    frac = np.clip(p.lung / max(float(p.lung.max()), 1e-6), 0, 1)
    delta = (amplitude * pattern + haze) * frac * zone * field
    mask = field & (zone > 0.25)
    return FindingEffect(delta.astype(np.float32), mask)


def interstitial_pattern(p: Patient, rng, s: float) -> FindingEffect:
    scale = p.size / 128
    n = bandpass_noise(rng, p.size, 1.1 * scale)
    nodules = np.clip(n - 1.6, 0, None) * 1.5
    lines = np.exp(-(n / 0.35) ** 2) * 0.5
    zone = _rows_between(p, 0.3, 1.0) * (0.5 + 0.5 * _rows_between(p, 0.55, 1.0))
    return _texture(p, rng, nodules + lines, 50.0 + 70.0 * s, zone, haze=HAZE_MM * (0.5 + s))


def reticular_interstitial_pattern(p: Patient, rng, s: float) -> FindingEffect:
    scale = p.size / 128
    n = bandpass_noise(rng, p.size, 0.8 * scale)
    net = np.exp(-(n / 0.3) ** 2)
    zone = _rows_between(p, 0.2, 1.0) * (0.3 + 0.7 * _peripheral(p))
    return _texture(p, rng, net, 55.0 + 75.0 * s, zone, haze=HAZE_MM * (0.5 + s))


def pulmonary_fibrosis(p: Patient, rng, s: float) -> FindingEffect:
    scale = p.size / 128
    n = bandpass_noise(rng, p.size, 1.8 * scale)
    net = np.exp(-(n / 0.4) ** 2) + 0.5 * np.clip(-n - 1.2, 0, None)  # coarse net + honeycomb holes
    zone = _rows_between(p, 0.45, 1.0) * (0.2 + 0.8 * _peripheral(p))
    eff = _texture(p, rng, net, 25.0 + 40.0 * s, zone, haze=HAZE_MM * (0.5 + s))
    # Volume loss: both bases rise a little.
    deficit, _ = _rewarp_lungs(p, np.full(p.size, (5.0 + 20.0 * s) * _mm(p), np.float32))
    eff.delta = eff.delta + (p.lung_deficit - deficit)
    return eff


def bronchiectasis(p: Patient, rng, s: float) -> FindingEffect:
    k = _mm(p)
    size = p.size
    delta = np.zeros((size, size), np.float32)
    zone = _rows_between(p, 0.45, 1.0)
    n_tubes = int(8 + round(12 * s))
    wall = 14.0 + 12.0 * s
    for _ in range(n_tubes):
        r0, c0 = _lung_centre(p, rng, 3 * k, zone)
        theta = np.arctan2(r0 - p.heart_row * size, c0 - p.mid_col * size) + rng.normal(0, 0.3)
        length = (10 + 15 * s) * k
        lumen = (1.5 + 2.0 * s) * k
        if rng.random() < 0.35:  # seen end-on: a ring
            outer, _ = _ellipse_chord(size, r0, c0, lumen + 0.8 * k * (1 + s), lumen + 0.8 * k * (1 + s), 0, 4.0)
            inner, _ = _ellipse_chord(size, r0, c0, lumen, lumen, 0, 4.0 * lumen / (lumen + 0.8 * k * (1 + s)))
            delta += np.clip(outer - inner, 0, None) * wall / 4.0
        else:  # in profile: tram-track lines
            for side in (-1, 1):
                rr = r0 + side * lumen * np.cos(theta)
                cc = c0 - side * lumen * np.sin(theta)
                ch, _ = _ellipse_chord(size, rr, cc, 0.5 * length, 1.2 * k, theta, 3.0)
                delta += ch * wall / 3.0
    field = lung_field(p)
    delta = np.minimum(delta, p.lung) * field
    mask = ndi.binary_dilation(delta > 0.05 * max(float(delta.max()), 1e-6), iterations=2) & field
    return FindingEffect(delta.astype(np.float32), mask)


_MAKERS = {
    "calcified granuloma": calcified_granuloma,
    "interstitial pattern": interstitial_pattern,
    "callus rib fracture": callus_rib_fracture,
    "hiatal hernia": hiatal_hernia,
    "hemidiaphragm elevation": hemidiaphragm_elevation,
    "bronchiectasis": bronchiectasis,
    "fibrotic band": fibrotic_band,
    "reticular interstitial pattern": reticular_interstitial_pattern,
    "pulmonary mass": pulmonary_mass,
    "pulmonary fibrosis": pulmonary_fibrosis,
}


def make_finding(name: str, patient: Patient, seed: int, severity: float) -> FindingEffect:
    """The finding ``name`` at ``severity`` for ``patient``; placement drawn from ``seed``."""
    if name not in _MAKERS:
        from cxrtune.errors import DataError

        raise DataError(f"finding {name!r} is not known: use one of {', '.join(FINDINGS)}")
    rng = np.random.default_rng([int(seed), 3])
    return _MAKERS[name](patient, rng, float(severity))


def boxes_of(mask: np.ndarray, mid_col: float | None = None) -> list[tuple[float, float, float, float]]:
    """Bounding boxes (x0, y0, x1, y1 in [0, 1]) of a mask: one per side of the midline when it
    spans both lungs, so a bilateral finding's box does not cover the mediastinum."""
    size = mask.shape[0]
    if not mask.any():
        return []
    parts = [mask]
    if mid_col is not None:
        cut = int(round(mid_col * size))
        left, right = mask.copy(), mask.copy()
        left[:, :cut] = False
        right[:, cut:] = False
        if left.any() and right.any() and min(left.sum(), right.sum()) > 0.1 * mask.sum():
            parts = [right, left]
    out = []
    for part in parts:
        rows = np.nonzero(part.any(axis=1))[0]
        cols = np.nonzero(part.any(axis=0))[0]
        out.append((cols.min() / size, rows.min() / size, (cols.max() + 1) / size, (rows.max() + 1) / size))
    return out
