"""Render synthetic chest radiographs from the projected CT layers.

A radiograph is the line integral of attenuation along the beam, so in the log domain the
projections of separate structures add. The renderer uses that twice:

1. *per patient* (once, reused by all of the patient's studies): every projected structure of the
   CT (body, lungs, spine, ribs, ...) is warped in 2D by its own transform (habitus, lung width and
   height, heart width, rib spacing and angle, a smooth elastic field), scaled (soft-tissue
   thickness, bone density, lung density), and summed with procedural vessel trees and breast
   shadows into two depth groups (anterior, posterior);
2. *per study*: each group is posed (small rotation, scale, shift; a small rotation about the
   vertical axis shifts the groups against each other: parallax), a finding's projected
   attenuation change is added, then exposure, window, detector blur, quantum noise,
   collimation and a side marker are applied and the image is quantised to uint8.

Everything is drawn from ``numpy.random.default_rng`` seeded by the row's patient and study seeds,
so the same row always renders the same bytes, whatever the call order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from cxrtune.data.phantom.segment import lung_field

#: Linear attenuation of water at the beam's effective energy (1/mm).
MU_WATER = 0.02


@dataclass
class BaseAnatomy:
    """One CT's projected layers on the base grid plus the landmarks the warps anchor to."""

    layers: dict[str, np.ndarray]
    apex_row: float      # topmost lung row (fraction of the image height)
    dome_row: float      # lowest row of the lung field (fraction)
    mid_col: float       # midline between the lungs (fraction of the width)
    heart_col: float     # centre of the cardiac silhouette (fraction)
    heart_row: float
    heart_halfwidth: float
    name: str = "ct"

    @classmethod
    def from_layers(cls, layers: dict[str, np.ndarray], name: str = "ct") -> "BaseAnatomy":
        n = layers["lung"].shape[0]
        field = lung_field(layers["lung"])
        rows = np.nonzero(field.any(axis=1))[0]
        cols = np.nonzero(field.any(axis=0))[0]
        heart = layers["heart"] > 0.5
        if heart.any():
            hr, hc = np.nonzero(heart)
            heart_row, heart_col = hr.mean() / n, hc.mean() / n
            halfwidth = 0.5 * (np.percentile(hc, 98) - np.percentile(hc, 2)) / n
        else:
            heart_row, heart_col, halfwidth = 0.6, 0.55, 0.12
        return cls(
            layers=layers, apex_row=rows.min() / n, dome_row=rows.max() / n,
            mid_col=0.5 * (cols.min() + cols.max()) / n, heart_col=heart_col, heart_row=heart_row,
            heart_halfwidth=max(halfwidth, 0.05), name=name,
        )

    @functools.lru_cache(maxsize=8)
    def at_size(self, size: int) -> dict[str, np.ndarray]:
        """The layers resampled (area-averaged) to the grid nearest ``size`` that is >= it, so
        warps sample without aliasing."""
        level = dict(self.layers)
        while level["lung"].shape[0] >= 2 * size:
            level = {k: 0.25 * (v[0::2, 0::2] + v[1::2, 0::2] + v[0::2, 1::2] + v[1::2, 1::2])
                     for k, v in level.items()}
        return level

    def __hash__(self) -> int:  # for the lru_cache of at_size
        return id(self)


# ---------------------------------------------------------------------------------------------
# Small, fast 2D helpers
# ---------------------------------------------------------------------------------------------

def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (reflecting edges). ``scipy.ndimage`` runs it single-threaded in C, which
    keeps it fast and bit-identical whatever the machine's BLAS threading."""
    if sigma <= 0.05:
        return img
    return ndi.gaussian_filter(img.astype(np.float32, copy=False), sigma, mode="reflect", truncate=3.0)


@functools.lru_cache(maxsize=32)
def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """(size x grid) cubic B-spline-like interpolation weights from a coarse grid to pixels."""
    x = (np.arange(size) + 0.5) / size * (grid - 1)
    d = x[:, None] - np.arange(grid)[None, :]
    w = np.clip(1.0 - np.abs(d) / 1.5, 0.0, None) ** 2  # smooth, compact bump
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_field(rng: np.random.Generator, size: int, grid: int = 5) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a coarse normal grid interpolated by two small
    matrix products (far cheaper than a spline zoom)."""
    coarse = rng.standard_normal((grid, grid)).astype(np.float32)
    u = _upsample_matrix(size, grid)
    return (u @ coarse @ u.T) / 1.2


def bandpass_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance band-pass noise: its zero crossings form a net of cells ~3 sigma wide."""
    n = rng.standard_normal((size, size)).astype(np.float32)
    b = blur(n, sigma) - blur(n, 2.5 * sigma)
    return b / (b.std() + 1e-6)


class Bilinear:
    """Bilinear lookup at fixed fractional pixel coordinates, shared by several layers.

    Computing the four neighbours and weights once and gathering every layer that shares the
    coordinates is several times faster than one ``map_coordinates`` call per layer.
    Outside the layer the value is 0 (``fill="zero"``) or the nearest edge (``"edge"``).
    """

    def __init__(self, rows_px: np.ndarray, cols_px: np.ndarray, n: int, fill: str = "zero") -> None:
        r = np.asarray(rows_px, np.float32)
        c = np.asarray(cols_px, np.float32)
        if fill == "edge":
            r = np.clip(r, 0.0, n - 1.0)
            c = np.clip(c, 0.0, n - 1.0)
            inside = None
        else:
            inside = (r > -1.0) & (r < n) & (c > -1.0) & (c < n)
        r0 = np.floor(r)
        c0 = np.floor(c)
        fr = r - r0
        fc = c - c0
        r0 = r0.astype(np.int64)
        c0 = c0.astype(np.int64)
        r1 = np.clip(r0 + 1, 0, n - 1)
        c1 = np.clip(c0 + 1, 0, n - 1)
        r0 = np.clip(r0, 0, n - 1)
        c0 = np.clip(c0, 0, n - 1)
        self.idx = [(r0 * n + c0).ravel(), (r0 * n + c1).ravel(), (r1 * n + c0).ravel(), (r1 * n + c1).ravel()]
        w = [(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc]
        if inside is not None:
            w = [x * inside for x in w]
        self.w = [x.ravel().astype(np.float32) for x in w]
        self.shape = r.shape

    def __call__(self, layer: np.ndarray) -> np.ndarray:
        flat = layer.ravel()
        out = flat[self.idx[0]] * self.w[0]
        for i, w in zip(self.idx[1:], self.w[1:]):
            out += flat[i] * w
        return out.reshape(self.shape)


def sampler(rows: np.ndarray, cols: np.ndarray, n: int) -> Bilinear:
    """A :class:`Bilinear` for fractional (rows, cols) in [0, 1] units on an n x n layer."""
    return Bilinear(rows * n - 0.5, cols * n - 0.5, n)


def sample(layer: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear lookup of ``layer`` at fractional (rows, cols) given in [0, 1] units."""
    return sampler(rows, cols, layer.shape[0])(layer)


# ---------------------------------------------------------------------------------------------
# Per patient
# ---------------------------------------------------------------------------------------------

@dataclass
class PatientParams:
    habitus_x: float
    habitus_y: float
    soft_tissue: float
    lung_width_right: float
    lung_width_left: float
    lung_height: float
    heart_width: float
    rib_spacing: float
    rib_angle: float
    bone_density: float
    lung_density: float
    vessel_density: float
    breast: float
    shift_x: float
    shift_y: float
    parenchyma: float        # amplitude of normal lung markings (mm water)
    parenchyma_px: float     # their grain (px at 128)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "PatientParams":
        u = rng.uniform
        return cls(
            habitus_x=u(0.82, 1.15), habitus_y=u(0.9, 1.08), soft_tissue=u(0.75, 1.35),
            lung_width_right=u(0.8, 1.2), lung_width_left=u(0.8, 1.2), lung_height=u(1.0, 1.3),
            heart_width=u(0.78, 1.35), rib_spacing=u(0.85, 1.15), rib_angle=u(-0.15, 0.15),
            bone_density=u(0.6, 1.5), lung_density=u(0.85, 1.12), vessel_density=u(0.6, 1.6),
            breast=float(rng.uniform(0.4, 1.0)) if rng.random() < 0.45 else 0.0,
            shift_x=u(-0.03, 0.03), shift_y=u(-0.03, 0.03),
            parenchyma=u(0.0, 4.0), parenchyma_px=float(np.exp(u(np.log(0.7), np.log(2.8)))),
        )


#: Clinical correlates of each finding: how a patient with it differs from the population beyond
#: the lesion itself, as shifts of ``PatientParams`` at severity 1 (a case of severity s gets
#: ``0.4 + 0.6 s`` of each). Restrictive lung disease shrinks the lungs and aerates them less
#: (fibrosis most, interstitial patterns less); bronchiectasis comes with air trapping (larger,
#: more aerated lungs); hiatal hernia with obesity; rib fracture callus with osteoporosis; a lung
#: mass with weight loss. Granuloma, fibrotic band and hemidiaphragm elevation are local findings
#: without a systemic correlate. Real archives carry such correlates, which is why a linear probe
#: on random features is above chance there (the study's random-init baseline: 0.55-0.59).
CORRELATES: dict[str, dict[str, float]] = {
    "pulmonary fibrosis": {"lung_height": -0.12, "lung_width_right": -0.08, "lung_width_left": -0.08,
                           "lung_density": -0.08},
    "interstitial pattern": {"lung_height": -0.06, "lung_density": -0.05},
    "reticular interstitial pattern": {"lung_height": -0.06, "lung_density": -0.05},
    "bronchiectasis": {"lung_height": 0.06, "lung_density": 0.05},
    "hiatal hernia": {"habitus_x": 0.08, "soft_tissue": 0.15},
    "callus rib fracture": {"bone_density": -0.3},
    "pulmonary mass": {"soft_tissue": -0.12},
}
#: Multiplier of every correlate (0: a finding changes nothing but its lesion, as before version 6).
CORRELATE_SCALE = 1.0


def with_correlates(p: PatientParams, finding: str | None, severity: float) -> PatientParams:
    """``p`` shifted by ``finding``'s clinical correlates (:data:`CORRELATES`) at ``severity``."""
    shifts = CORRELATES.get(finding or "", {})
    if not shifts or CORRELATE_SCALE == 0.0:
        return p
    k = CORRELATE_SCALE * (0.4 + 0.6 * float(severity))
    return replace(p, **{name: getattr(p, name) + k * d for name, d in shifts.items()})


@dataclass
class Patient:
    """A patient's warped layers at one image size, shared by all of the patient's studies."""

    size: int
    params: PatientParams
    front: np.ndarray          # anterior group (mm water)
    back: np.ndarray           # posterior group
    lung: np.ndarray           # warped lung thickness (mm): where findings may go
    lung_deficit: np.ndarray
    rib: np.ndarray            # warped rib layer (mm water excess)
    heart: np.ndarray          # cardiac silhouette (0/1)
    body: np.ndarray           # body thickness (mm)
    left: np.ndarray           # 1 on the patient's left lung
    apex_row: float
    dome_row: float
    mid_col: float
    heart_col: float
    heart_row: float
    heart_halfwidth: float


def _lung_warp(base: BaseAnatomy, p: PatientParams, r: np.ndarray, c: np.ndarray):
    """Source coordinates for the lung layers: width per side about the midline, height about
    the apex (diaphragm position), and the heart's width pushing the lungs sideways."""
    mid = base.mid_col
    side = 1.0 / (1.0 + np.exp(-(c - mid) / 0.02))  # 0 right lung, 1 left lung (image columns)
    w = p.lung_width_right * (1 - side) + p.lung_width_left * side
    c_src = mid + (c - mid) / w
    r_src = base.apex_row + (r - base.apex_row) / p.lung_height
    # Heart: horizontal expansion about its centre, fading above, below and lateral to it.
    hc, hr, hw = base.heart_col, base.heart_row, base.heart_halfwidth
    bump = np.exp(-0.5 * ((r_src - hr) / (1.2 * hw)) ** 2) * np.exp(-0.5 * ((c_src - hc) / (1.6 * hw)) ** 2)
    c_src = c_src - (c_src - hc) * (1.0 - 1.0 / p.heart_width) * bump
    return r_src, c_src


def vessel_tree(rng: np.random.Generator, size: int, hila: list[tuple[float, float]],
                density: float) -> np.ndarray:
    """Procedural pulmonary vessels: branching, tapering segments from each hilum, splatted as
    points and blurred. Values are mm of water excess (projected vessel thickness)."""
    segments = []  # (r0, c0, angle, length, width, direction)
    for (hr, hc), direction in zip(hila, (-1.0, 1.0)):
        frontier = []
        for _ in range(int(rng.integers(4, 7))):
            angle = rng.uniform(-1.3, 1.3) + (np.pi / 2 if rng.random() < 0.7 else -np.pi / 2)
            frontier.append((hr, hc, angle, rng.uniform(0.09, 0.15), 3.5 * rng.uniform(0.8, 1.2)))
        for depth in range(4):
            nxt = []
            for r0, c0, a, length, width in frontier:
                segments.append((r0, c0, a, length, width, direction))
                end_r = r0 + np.sin(a) * length
                end_c = c0 + np.cos(a) * length * direction
                for turn in (-1, 1):
                    nxt.append((end_r, end_c, a + turn * rng.uniform(0.15, 0.6), length * rng.uniform(0.55, 0.8),
                                width * rng.uniform(0.6, 0.8)))
            frontier = nxt
    seg = np.array(segments, dtype=np.float64)
    n_pts = max(4, int(0.18 * size))
    t = np.linspace(0.0, 1.0, n_pts)[None, :]
    r = (seg[:, 0:1] + np.sin(seg[:, 2:3]) * seg[:, 3:4] * t) * size
    c = (seg[:, 1:2] + np.cos(seg[:, 2:3]) * seg[:, 3:4] * seg[:, 5:6] * t) * size
    w = np.broadcast_to(seg[:, 4:5] * density / (n_pts * 0.15 * seg[:, 3:4] * size + 1), r.shape)
    ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
    img = np.bincount((r[ok].astype(np.int64) * size + c[ok].astype(np.int64)), weights=w[ok] * 3.0,
                      minlength=size * size).reshape(size, size).astype(np.float32)
    return blur(img, 0.7 * size / 128)


def make_patient(base: BaseAnatomy, size: int, seed: int, light: bool = False, finding: str | None = None,
                 severity: float = 0.0) -> Patient:
    """A patient drawn from ``seed``, with ``finding``'s clinical correlates at ``severity``
    (:data:`CORRELATES`; the lesion itself is added per study). ``light`` skips vessels and
    breast shadows (geometry only, for ground-truth masks: same landmarks and lung layers, fewer
    pixels to draw)."""
    rng = np.random.default_rng([int(seed), 1])
    p = with_correlates(PatientParams.draw(rng), finding, severity)
    L = base.at_size(size)
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    R, C = np.meshgrid(g, g, indexing="ij")
    # Global warp: habitus about the midline and the apex, a shift, and a smooth elastic field
    # of about 4.5 % of the image.
    amp = 0.045
    er = smooth_field(rng, size) * amp
    ec = smooth_field(rng, size) * amp
    r0 = base.apex_row + (R - base.apex_row - p.shift_y) / p.habitus_y + er
    c0 = base.mid_col + (C - 0.5 - p.shift_x) / p.habitus_x + ec
    n = L["body"].shape[0]
    glob = sampler(r0, c0, n)
    body, soft, spine = glob(L["body"]), glob(L["soft_excess"]), glob(L["spine"])
    rl, cl = _lung_warp(base, p, r0, c0)
    lw = sampler(rl, cl, n)
    lung, deficit, left = lw(L["lung"]), lw(L["lung_deficit"]), lw(L["lung_left_px"])
    heart = sample(L["heart"], r0, base.heart_col + (c0 - base.heart_col) / p.heart_width)
    # Ribs: spacing about the apex and a shear that steepens or flattens them laterally.
    rr = base.apex_row + (r0 - base.apex_row) / p.rib_spacing + p.rib_angle * np.abs(c0 - base.mid_col)
    rw = sampler(rr, c0, n)
    bone_ant, bone_post = rw(L["bone_ant"]), rw(L["bone_post"])
    # Landmarks in this patient's image coordinates (forward map of the base landmarks).
    apex = base.apex_row + p.shift_y
    dome = base.apex_row + (base.dome_row - base.apex_row) * p.lung_height * p.habitus_y + p.shift_y
    mid = 0.5 + p.shift_x
    heart_col = 0.5 + p.shift_x + (base.heart_col - base.mid_col) * p.habitus_x
    heart_row = base.apex_row + (base.heart_row - base.apex_row) * p.habitus_y + p.shift_y
    field = lung >= 0.45 * max(float(lung.max()), 1e-6)
    hila = []
    for side in (0, 1):
        sel = field & ((left > 0.5) if side else (left <= 0.5))
        if sel.any():
            rows, cols = np.nonzero(sel)
            hila.append((float(np.percentile(rows, 45)) / size,
                         float(np.percentile(cols, 80 if side == 0 else 20)) / size))
        else:
            hila.append((0.42, 0.4 if side == 0 else 0.6))
    vessels = np.zeros_like(body) if light else vessel_tree(rng, size, hila, p.vessel_density) * np.clip(lung / 40.0, 0, 1)
    breast = np.zeros_like(body)
    if p.breast > 0 and not light:
        for side_col in (mid - 0.2 * p.habitus_x, mid + 0.2 * p.habitus_x):
            cr = dome - 0.04 + rng.uniform(-0.03, 0.03)
            d = ((R - cr) / 0.13) ** 2 + ((C - side_col) / (0.17 * p.habitus_x)) ** 2
            breast += 35.0 * p.breast * np.clip(1.0 - d, 0.0, None) ** 0.5
        breast *= (body > 1).astype(np.float32)
    if p.parenchyma > 0 and not light:
        grain = bandpass_noise(rng, size, p.parenchyma_px * size / 128)
        vessels = vessels + p.parenchyma * np.abs(grain) * np.clip(lung / max(float(lung.max()), 1e-6), 0, 1)
    soft_body = p.soft_tissue * body + soft
    deficit = deficit * p.lung_density
    bone = p.bone_density
    front = 0.5 * (soft_body - deficit + vessels) + bone * bone_ant + breast
    back = 0.5 * (soft_body - deficit + vessels) + bone * (bone_post + spine)
    return Patient(
        size=size, params=p, front=front.astype(np.float32), back=back.astype(np.float32),
        lung=lung.astype(np.float32), lung_deficit=deficit.astype(np.float32),
        rib=(bone_ant + bone_post).astype(np.float32), heart=heart.astype(np.float32),
        body=body.astype(np.float32), left=left.astype(np.float32), apex_row=apex, dome_row=dome,
        mid_col=mid, heart_col=heart_col, heart_row=heart_row,
        heart_halfwidth=base.heart_halfwidth * p.habitus_x * p.heart_width,
    )


# ---------------------------------------------------------------------------------------------
# Per study
# ---------------------------------------------------------------------------------------------

@dataclass
class StudyParams:
    rotation_deg: float
    scale: float
    shift_x: float
    shift_y: float
    parallax: float
    bone_boost: float
    window_lo: float
    window_hi: float
    gamma: float
    blur_px: float
    noise: float
    collimation: tuple[float, float, float, float]
    marker: int          # 0: none, 1: "R" top left, 2: "L" top right
    marker_pos: tuple[float, float]
    sharpen: float       # unsharp-mask gain of the detector's post-processing
    sharpen_px: float    # its radius (px at 128)
    grid_amp: float      # anti-scatter grid lines (0: none)
    grid_period: float   # their period (px at 128)
    noise_grain: float   # correlation length of the detector noise (px at 128)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "StudyParams":
        u = rng.uniform
        collimate = rng.random() < 0.6
        col = tuple(float(u(0.0, 0.07)) if collimate else 0.0 for _ in range(4))
        return cls(
            rotation_deg=u(-4, 4), scale=u(0.95, 1.05), shift_x=u(-0.03, 0.03), shift_y=u(-0.03, 0.03),
            parallax=u(-0.012, 0.012), bone_boost=u(1.5, 2.2), window_lo=u(1.15, 1.55),
            window_hi=u(5.3, 5.9), gamma=u(0.9, 1.12), blur_px=u(0.2, 1.0), noise=float(np.exp(u(np.log(0.002), np.log(0.015)))),
            collimation=col, marker=int(rng.integers(0, 3)), marker_pos=(u(0.03, 0.12), u(0.04, 0.16)),
            sharpen=u(0.0, 0.6), sharpen_px=u(2.0, 6.0),
            grid_amp=u(0.005, 0.02) if rng.random() < 0.25 else 0.0, grid_period=u(2.2, 4.0),
            noise_grain=float(np.exp(u(np.log(0.3), np.log(1.8)))),
        )


def pose_coords(size: int, s: StudyParams, extra_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Source (row, col) pixel coordinates for the study's pose (rotation, scale, shift)."""
    g = np.arange(size, dtype=np.float32) + 0.5 - size / 2
    R, C = np.meshgrid(g, g, indexing="ij")
    th = np.deg2rad(s.rotation_deg)
    cos, sin = np.cos(th) / s.scale, np.sin(th) / s.scale
    r = cos * R - sin * C - (s.shift_y) * size
    c = sin * R + cos * C - (s.shift_x + extra_shift) * size
    return r + size / 2 - 0.5, c + size / 2 - 0.5


def apply_pose(img: np.ndarray, coords: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return Bilinear(coords[0], coords[1], img.shape[0], fill="edge")(img)


_FONT = {
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
}


def stamp_marker(img: np.ndarray, letter: str, pos: tuple[float, float], right: bool) -> None:
    size = img.shape[0]
    glyph = np.array([[ch == "1" for ch in row] for row in _FONT[letter]], dtype=np.float32)
    k = max(1, int(round(size / 64)))
    glyph = np.kron(glyph, np.ones((k, k), np.float32))
    h, w = glyph.shape
    r0 = int(pos[0] * size)
    c0 = int(pos[1] * size) if not right else size - int(pos[1] * size) - w
    r0, c0 = min(max(r0, 0), size - h), min(max(c0, 0), size - w)
    region = img[r0:r0 + h, c0:c0 + w]
    region[:] = np.maximum(region, 0.97 * glyph)


def finish(total: np.ndarray, s: StudyParams, rng: np.random.Generator) -> np.ndarray:
    """Exposure and display (log domain window + gamma), blur, quantum noise, collimation,
    marker; returns uint8."""
    size = total.shape[0]
    att = MU_WATER * total
    v = np.clip((att - s.window_lo) / (s.window_hi - s.window_lo), 0.0, 1.0) ** s.gamma
    v = blur(v, s.blur_px * size / 128)
    if s.sharpen > 0:  # the vendor's edge enhancement
        v = v + s.sharpen * (v - blur(v, s.sharpen_px * size / 128))
    if s.grid_amp > 0:
        rows = np.arange(size, dtype=np.float32)[:, None]
        v = v + s.grid_amp * np.sin(2 * np.pi * rows / (s.grid_period * size / 128))
    # Quantum noise: fewer photons behind dense parts, so more noise where the image is bright.
    sigma = s.noise * np.sqrt(np.exp(np.clip(att, 0, 8) - 4.0)) + 0.004
    grain = rng.standard_normal((size, size)).astype(np.float32)
    g_px = s.noise_grain * size / 128
    if g_px > 0.3:
        grain = blur(grain, g_px)
        grain /= grain.std() + 1e-6
    v = v + sigma * grain
    top, bottom, left, right = (int(round(x * size)) for x in s.collimation)
    if top or bottom or left or right:
        edge = 0.88
        if top:
            v[:top] = edge
        if bottom:
            v[size - bottom:] = edge
        if left:
            v[:, :left] = edge
        if right:
            v[:, size - right:] = edge
    if s.marker:
        stamp_marker(v, "R" if s.marker == 1 else "L", s.marker_pos, right=s.marker == 2)
    return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)


def pose_mask(patient: Patient, study_seed: int, mask: np.ndarray) -> np.ndarray:
    """The study's posed version of a patient-coordinate mask, without rendering the image."""
    rng = np.random.default_rng([int(study_seed), 2])
    s = StudyParams.draw(rng)
    return apply_pose(mask.astype(np.float32), pose_coords(patient.size, s, +s.parallax)) > 0.5


def render_study(patient: Patient, study_seed: int, delta: np.ndarray | None = None,
                 mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, StudyParams]:
    """One study of ``patient``: pose, add a finding's projected attenuation ``delta`` (mm water,
    patient coordinates, anterior group), finish. Returns (uint8 image, posed mask or None,
    study parameters)."""
    rng = np.random.default_rng([int(study_seed), 2])
    s = StudyParams.draw(rng)
    size = patient.size
    front = patient.front if delta is None else patient.front + delta
    # Bone contrast depends on the beam: the study's boost scales the excess of both groups'
    # bone (kept linear: front/back already hold bone at boost 1).
    coords_f = pose_coords(size, s, +s.parallax)
    coords_b = pose_coords(size, s, -s.parallax)
    back = patient.back + ((s.bone_boost - 1.0) * patient.params.bone_density) * patient.rib
    total = apply_pose(front, coords_f) + apply_pose(back, coords_b)
    posed_mask = None
    if mask is not None:
        posed_mask = apply_pose(mask.astype(np.float32), coords_f) > 0.5
    return finish(total, s, rng), posed_mask, s
