"""Segment a chest CT into the structures the renderer varies, and project each one.

Everything is done with Hounsfield thresholds and connected components (``scipy.ndimage``), so
any NIfTI chest CT a user adds works without a trained model:

- body: holes filled slice by slice (so the lungs lie inside it), opened by a few mm to cut the
  table and blanket loose, the largest component;
- lungs: air (< -400 HU) inside the body, the two largest components (bowel gas is small);
- bones: > 180 HU next to cortical bone (> 450 HU), so contrast-filled vessels stay soft tissue;
  bone deep in the mediastinum between the lungs is dropped; the spine is the bone near the
  lungs' midline behind their centre; the rest (ribs, clavicles, scapulae, sternum) is split into
  anterior and posterior halves so that a small rotation can shift them apart (parallax);
- heart: a 2D cardiac silhouette from the lung projection (:func:`cardiac_silhouette`);
- everything else inside the body is soft tissue.

A radiograph is a line integral, so each structure's contribution projects separately and the
projections add (:class:`Layers`). Attenuation is measured relative to water (``1 + HU/1000``)
and integrated in mm along the posterior -> anterior axis.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage as ndi

from cxrtune.data.phantom.ct import CTVolume
from cxrtune.errors import DataError

#: Version of the segmentation and projection code: part of the derived-array cache key.
SEGMENT_VERSION = 4
#: Side of the square base projections (pixels) and their field of view (mm).
BASE_SIZE = 256
FOV_MM = 340.0
#: In-plane resampling step (voxels) before segmenting: 2 turns 0.7 mm into 1.4 mm.
INPLANE_STEP = 2


@dataclass
class Layers:
    """Projected structures on the base grid (rows = superior -> inferior, columns = patient's
    right -> left, i.e. the radiological view). Thicknesses in mm, attenuation excess in mm of
    water."""

    body: np.ndarray        # body thickness (mm)
    lung: np.ndarray        # lung thickness (mm)
    lung_deficit: np.ndarray  # sum over lung of (1 - rho): air that replaces tissue (mm water)
    soft_excess: np.ndarray   # sum over soft tissue of (rho - 1): fat negative, blood positive
    spine: np.ndarray       # sum over spine of (rho - 1)
    bone_ant: np.ndarray    # other bones, anterior half
    bone_post: np.ndarray   # other bones, posterior half
    heart: np.ndarray       # 1 on the cardiac silhouette (2D, from the lung projection)
    lung_left_px: np.ndarray  # 1 where the projected lung belongs to the patient's left lung

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n) for n in self.names()}


def _largest(mask: np.ndarray, k: int = 1, min_voxels: int = 0) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1][:k]
    keep = [i + 1 for i in order if sizes[i] >= min_voxels]
    return np.isin(lab, keep)


def segment(ct: CTVolume) -> dict[str, np.ndarray]:
    """Boolean masks (on the in-plane downsampled grid) of body, lung, spine, bone, heart."""
    hu = ct.hu[::INPLANE_STEP, ::INPLANE_STEP, :].astype(np.float32)
    sx, sy, sz = ct.spacing[0] * INPLANE_STEP, ct.spacing[1] * INPLANE_STEP, ct.spacing[2]
    voxel_ml = sx * sy * sz / 1000.0
    # Fill each slice's holes first (so the lungs belong to the body), then open by a few mm to
    # cut the table and blanket loose, and keep the largest component.
    dense = hu > -500
    for z in range(dense.shape[2]):
        dense[:, :, z] = ndi.binary_fill_holes(dense[:, :, z])
    steps = max(1, int(round(3.0 / sx)))
    flat = np.ones((3, 3, 1), bool)
    dense = ndi.binary_opening(dense, structure=flat, iterations=steps)
    body = _largest(dense, 1)
    if body.sum() * voxel_ml < 2000:
        raise DataError(f"phantom CT {ct.path}: no body found (largest tissue component under 2 litres)")
    body = ndi.binary_closing(body, structure=flat, iterations=steps)
    for z in range(body.shape[2]):
        body[:, :, z] = ndi.binary_fill_holes(body[:, :, z])
    air = (hu < -400) & body
    air = ndi.binary_opening(air, iterations=1)
    lung = _largest(air, 2, min_voxels=int(150 / voxel_ml))
    if lung.sum() * voxel_ml < 500:
        raise DataError(f"phantom CT {ct.path}: lungs not found (air inside the body under 0.5 litre)")
    lung = ndi.binary_closing(lung, iterations=2) & body
    for z in range(lung.shape[2]):
        lung[:, :, z] = ndi.binary_fill_holes(lung[:, :, z])
    # Bone: above 180 HU near cortical bone (> 450 HU); contrast-filled vessels (150-400 HU)
    # have no such shell and stay soft tissue.
    bone = (hu > 180) & body & ~lung & ndi.binary_dilation(hu > 450, iterations=2)
    # Midline and depth landmarks from the lungs.
    xs, ys, zs = np.nonzero(lung)
    x_mid = 0.5 * (np.percentile(xs, 2) + np.percentile(xs, 98))
    y_mid = np.median(ys)
    xx = np.arange(hu.shape[0])[:, None, None]
    yy = np.arange(hu.shape[1])[None, :, None]
    spine = bone & (np.abs(xx - x_mid) * sx < 28) & (yy < y_mid)
    other_bone = bone & ~spine
    # Contrast-filled vessels in the mediastinum can pass the bone test: drop bone that lies
    # between the two lungs on its own row of its slice and deeper than 20 mm below the skin
    # (the spine has its own mask; ribs lie lateral to the lungs, sternum near the skin).
    between = np.zeros_like(lung)
    for z in range(hu.shape[2]):
        for y in np.nonzero(lung[:, :, z].any(axis=0))[0]:
            cols = np.nonzero(lung[:, y, z])[0]
            if cols.size >= 2:
                between[cols.min():cols.max() + 1, y, z] = True
    deep = ndi.distance_transform_edt(body, sampling=(sx, sy, sz)) > 20.0
    other_bone &= ~(between & deep & ~lung)
    left = np.zeros_like(lung)
    left[int(round(x_mid)):, :, :] = True
    return {
        "hu": hu, "body": body, "lung": lung, "spine": spine, "bone": other_bone,
        "left": left, "spacing": np.array([sx, sy, sz]), "y_mid": np.array(y_mid),
        "x_mid": np.array(x_mid), "z_top": np.array(np.percentile(zs, 99.5)),
    }


def lung_field(lung: np.ndarray, frac: float = 0.45) -> np.ndarray:
    """The projected lung field: lung thickness >= ``frac`` x its maximum. A lower threshold
    would include lung behind the heart and below the domes, where findings vanish."""
    return lung >= frac * float(lung.max())


def cardiac_silhouette(lung: np.ndarray) -> np.ndarray:
    """Where the heart shows: inside the hull of the lungs, in the lower 55 % of the lung's
    height, near the midline, where the lung in front of and behind it is thin."""
    rel = lung / max(float(lung.max()), 1e-6)
    rows = np.nonzero((rel > 0.45).any(axis=1))[0]
    heart = np.zeros(lung.shape, bool)
    if rows.size == 0:
        return heart.astype(np.float32)
    top, bottom = rows.min(), rows.max()
    n = lung.shape[1]
    for r in range(int(top + 0.45 * (bottom - top)), bottom + 1):
        cols = np.nonzero(rel[r] > 0.15)[0]
        if cols.size < 2:
            continue
        lo, hi = max(cols.min(), int(0.32 * n)), min(cols.max(), int(0.75 * n))
        heart[r, lo:hi + 1] = rel[r, lo:hi + 1] < 0.5
    heart = ndi.binary_opening(heart, iterations=3)
    heart = _largest(heart, 1)
    return ndi.binary_fill_holes(heart).astype(np.float32)


def project(ct: CTVolume) -> Layers:
    """Segment ``ct`` and project each structure onto the square base grid."""
    seg = segment(ct)
    hu, body, lung = seg["hu"], seg["body"], seg["lung"]
    sx, sy, sz = (float(v) for v in seg["spacing"])
    rho = np.clip(1.0 + hu / 1000.0, 0.0, None)
    soft = body & ~lung & ~seg["spine"] & ~seg["bone"]
    y_mid = float(seg["y_mid"])
    ant = np.zeros(hu.shape[1], bool)
    ant[int(round(y_mid)):] = True
    bone = seg["bone"]
    raw = {
        "body": body.sum(axis=1) * sy,
        "lung": lung.sum(axis=1) * sy,
        "lung_deficit": np.where(lung, 1.0 - rho, 0.0).sum(axis=1) * sy,
        "soft_excess": np.where(soft, np.clip(rho - 1.0, -0.3, 0.6), 0.0).sum(axis=1) * sy,
        "spine": np.where(seg["spine"], rho - 1.0, 0.0).sum(axis=1) * sy,
        "bone_ant": np.where(bone & ant[None, :, None], rho - 1.0, 0.0).sum(axis=1) * sy,
        "bone_post": np.where(bone & ~ant[None, :, None], rho - 1.0, 0.0).sum(axis=1) * sy,
        "lung_left_px": (lung & seg["left"]).sum(axis=1) > (lung & ~seg["left"]).sum(axis=1),
    }
    # Base grid: FOV_MM square; columns follow x, rows follow z from superior to inferior.
    # The lung apex is placed 7 % of the field below the top edge; the rest of the field above
    # the CT's coverage is filled by extending the top slice (neck and shoulders).
    n_x, n_z = hu.shape[0], hu.shape[2]
    px_mm = FOV_MM / BASE_SIZE
    cols = np.arange(BASE_SIZE)
    rows = np.arange(BASE_SIZE)
    x_mid = float(seg["x_mid"])
    x_vox = x_mid + (cols - BASE_SIZE / 2 + 0.5) * px_mm / sx
    z_top = float(seg["z_top"])
    apex_row = 0.07 * BASE_SIZE
    z_vox = z_top - (rows - apex_row) * px_mm / sz
    zz, xx = np.meshgrid(z_vox, x_vox, indexing="ij")
    coords = np.stack([np.clip(xx, 0, n_x - 1), np.clip(zz, 0, n_z - 1)])
    outside_x = (xx < 0) | (xx > n_x - 1)
    layers = {}
    for name, arr in raw.items():
        order = 0 if arr.dtype == bool else 1
        grid = ndi.map_coordinates(arr.astype(np.float32), coords, order=order, mode="nearest")
        grid[outside_x] = 0.0
        if name in ("lung", "lung_deficit", "lung_left_px"):
            grid[(zz > n_z - 1) | (zz < 0)] = 0.0
        layers[name] = grid.astype(np.float32)
    # Fade the extrapolated parts (above and below the CT) over ~40 mm so no hard edge shows.
    fade = np.ones_like(zz, dtype=np.float32)
    above = zz > n_z - 1
    fade[above] = np.clip(1.0 - (zz[above] - (n_z - 1)) * sz / 60.0, 0.35, 1.0)
    for name in ("bone_ant", "bone_post"):
        layers[name] *= np.where(above, np.clip(1.0 - (zz - (n_z - 1)) * sz / 25.0, 0.0, 1.0), 1.0)
    layers["heart"] = cardiac_silhouette(layers["lung"])
    layers["body"] *= fade
    layers["soft_excess"] *= fade
    return Layers(**layers)
