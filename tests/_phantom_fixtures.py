"""A small procedural chest CT for the phantom's unit tests (no download, built in ~0.1 s).

Body: an elliptic cylinder of soft tissue (40 HU) on a table slab (separate, 300 HU) with a
blanket-free air background; two lung ellipsoids (-850 HU); a vertebral column behind them
(700 HU); ribs as elliptic shells in a few slices (700 HU); a heart ellipsoid between the lungs.
The volume is written in the real CT's orientation (L, A, S) with a NIfTI affine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPACING = (2.8, 2.8, 5.0)
SHAPE = (128, 112, 64)


def procedural_ct() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    nx, ny, nz = SHAPE
    x = (np.arange(nx) - nx / 2 + 0.5) * SPACING[0]   # toward the patient's left (mm)
    y = (np.arange(ny) - ny / 2 + 0.5) * SPACING[1]   # posterior -> anterior
    z = (np.arange(nz) - nz / 2 + 0.5) * SPACING[2]   # inferior -> superior
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    hu = np.full(SHAPE, -1000.0, np.float32)
    body = (X / 160) ** 2 + (Y / 105) ** 2 <= 1.0
    hu[body] = 40.0
    table = (Y < -125) & (Y > -140) & (np.abs(X) < 170)
    hu[table] = 300.0
    lungs = np.zeros(SHAPE, bool)
    for cx in (-70.0, 70.0):
        lungs |= ((X - cx) / 55) ** 2 + ((Y - 5) / 70) ** 2 + ((Z - 20) / 110) ** 2 <= 1.0
    hu[lungs] = -850.0
    heart = ((X - 20) / 50) ** 2 + ((Y - 30) / 45) ** 2 + ((Z + 40) / 50) ** 2 <= 1.0
    hu[heart & ~lungs] = 45.0
    spine = (X / 18) ** 2 + ((Y + 80) / 18) ** 2 <= 1.0
    hu[spine] = 700.0
    ribs = np.zeros(SHAPE, bool)
    shell = np.abs(np.sqrt((X / 150) ** 2 + (Y / 95) ** 2) - 1.0) < 0.05
    for zc in np.arange(-80, 130, 24.0):
        ribs |= shell & (np.abs(Z - zc) < 5)
    hu[ribs] = 700.0
    return hu, {"body": body, "lungs": lungs, "spine": spine, "ribs": ribs, "table": table}


def write_procedural_ct(path: Path) -> Path:
    import nibabel as nib

    hu, _ = procedural_ct()
    affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(path))
    return path


def phantom_env(monkeypatch, tmp_path: Path) -> Path:
    """Point the cache and the CT at a temporary folder holding the procedural CT."""
    ct = write_procedural_ct(tmp_path / "procedural.nii.gz")
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXRTUNE_PHANTOM_CT", str(ct))
    return ct
