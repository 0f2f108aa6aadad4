"""The real label files of NIH ChestX-ray14, PadChest and CheXpert, for parser tests.

They ship in the ``data/`` folder of the torchxrayvision wheel (a test-only input: nothing in
cxrtune imports torchxrayvision). :func:`real_metadata_path` returns a folder holding them,
looking in this order:

1. ``$CXRTUNE_TEST_METADATA`` (a folder you filled yourself; it must hold every file);
2. ``~/.cache/cxrtune-test/torchxrayvision-1.5.7/`` (filled by an earlier run);
3. the wheel in ``$CXRTUNE_TEST_WHEELHOUSE`` if that folder holds it, else
   ``python -m pip download --no-deps torchxrayvision==1.5.7``; the four files are extracted,
   checked against their SHA-256 and renamed into the cache folder in one step.

If none works the tests fail (never skip) with a message saying what to fetch and where.
Use the fixture by importing it into a test module::

    from _real_metadata import real_metadata_dir  # noqa: F401  (a pytest fixture)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

TXV_VERSION = "1.5.7"
WHEEL_NAME = f"torchxrayvision-{TXV_VERSION}-py3-none-any.whl"
#: file name -> SHA-256 of the copy inside the torchxrayvision 1.5.7 wheel.
FILES = {
    "Data_Entry_2017_v2020.csv.gz": "9d4de640ee4f760215d8be98376b20387ca52f9c6b4d1b727cb588fb82f40b80",
    "BBox_List_2017.csv.gz": "cf9dc6029f65daa8b389415b0546af0eeeb91fbac7d63ec49d7f8de2fd8f40cd",
    "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz": "34a10144a87fe00c176f23f9aa174a10137fd425882b09d8fb012ab817d99d65",
    "chexpert_train.csv.gz": "cdd70817ac2f13e464d2e35de78cd6831b10382c869c3824c35b44f55928becb",
}
ENV_DIR = "CXRTUNE_TEST_METADATA"
ENV_WHEELHOUSE = "CXRTUNE_TEST_WHEELHOUSE"
CACHE_DIR = Path.home() / ".cache" / "cxrtune-test" / f"torchxrayvision-{TXV_VERSION}"
HOW_TO_FIX = (
    f"fetch the torchxrayvision {TXV_VERSION} wheel (`pip download --no-deps torchxrayvision=={TXV_VERSION}`) "
    f"and either put it in a folder named by ${ENV_WHEELHOUSE}, or extract torchxrayvision/data/"
    f"{{{', '.join(FILES)}}} into a folder named by ${ENV_DIR}"
)


class MetadataUnavailable(RuntimeError):
    """The real label files could not be found or fetched."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _problems(folder: Path, check_hash: bool = True) -> list[str]:
    out = []
    for name, digest in FILES.items():
        path = folder / name
        if not path.is_file():
            out.append(f"{name} is missing")
        elif check_hash and _sha256(path) != digest:
            out.append(f"{name} has the wrong SHA-256")
    return out


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"torchxrayvision=={TXV_VERSION}", "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MetadataUnavailable(f"`{' '.join(cmd)}` failed ({exc}); {HOW_TO_FIX}") from exc
    wheel = dest / WHEEL_NAME
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr or done.stdout).strip()[-800:]
        raise MetadataUnavailable(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {tail}\n{HOW_TO_FIX}")
    return wheel


def _extract(wheel: Path, target: Path) -> None:
    """Extract the label files into a temporary sibling of ``target``, verify, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in FILES:
                with archive.open(f"torchxrayvision/data/{name}") as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        bad = _problems(tmp)
        if bad:
            raise MetadataUnavailable(f"{wheel}: {'; '.join(bad)}; {HOW_TO_FIX}")
        try:
            os.rename(tmp, target)
        except OSError:
            if _problems(target):  # not a concurrent run that finished first
                raise
    except (KeyError, zipfile.BadZipFile) as exc:
        raise MetadataUnavailable(f"{wheel} is not the expected wheel ({exc}); {HOW_TO_FIX}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def real_metadata_path(cache_dir: Path = CACHE_DIR) -> Path:
    """A folder holding every file in :data:`FILES` (see the module docstring)."""
    if os.environ.get(ENV_DIR):
        folder = Path(os.environ[ENV_DIR]).expanduser()
        bad = _problems(folder)
        if bad:
            raise MetadataUnavailable(f"${ENV_DIR} = {folder}: {'; '.join(bad)}; {HOW_TO_FIX}")
        return folder
    if not _problems(cache_dir, check_hash=False):
        return cache_dir
    shutil.rmtree(cache_dir, ignore_errors=True)  # incomplete: start over
    wheelhouse = os.environ.get(ENV_WHEELHOUSE)
    if wheelhouse and (Path(wheelhouse) / WHEEL_NAME).is_file():
        _extract(Path(wheelhouse) / WHEEL_NAME, cache_dir)
        return cache_dir
    with tempfile.TemporaryDirectory(prefix="cxrtune-txv-") as tmp:
        _extract(_download_wheel(Path(tmp)), cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def real_metadata_dir() -> Path:
    """Folder with the real NIH, PadChest and CheXpert label CSVs (.csv.gz)."""
    try:
        return real_metadata_path()
    except MetadataUnavailable as exc:
        pytest.fail(f"real label files unavailable: {exc}", pytrace=False)
