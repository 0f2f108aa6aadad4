"""The anatomy pool: the projected layers of every chest CT the phantom draws patients from.

Segmenting and projecting a CT takes seconds, so the layers are cached in
``<cache_root>/phantom/layers-<ct sha256[:16]>-v<version>.npz`` and loaded in milliseconds after
the first run. A process keeps the pool it loaded (the cache builder's workers render many chunks).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numpy as np

from cxrtune.data.phantom.ct import cache_root, load_ct, phantom_ct_path, sha256_of
from cxrtune.data.phantom.render import BaseAnatomy
from cxrtune.data.phantom.segment import BASE_SIZE, FOV_MM, SEGMENT_VERSION, Layers, project
from cxrtune.errors import DataError

CT_SUFFIXES = (".nii", ".nii.gz")


def layers_cache_path(sha256: str) -> Path:
    return cache_root() / "phantom" / f"layers-{sha256[:16]}-v{SEGMENT_VERSION}-{BASE_SIZE}-{int(FOV_MM)}.npz"


def load_layers(ct_path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """The projected layers of one CT (computed once, then read from the cache); its sha256."""
    ct_path = Path(ct_path)
    sha = sha256_of(ct_path)
    cached = layers_cache_path(sha)
    if cached.is_file():
        with np.load(cached) as z:
            return {k: z[k] for k in Layers.names()}, sha
    layers = project(load_ct(ct_path))
    arrays = layers.as_dict()
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=cached.name + ".", suffix=".tmp.npz", dir=cached.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, cached)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return arrays, sha


def extra_cts(folder: str | Path | None) -> list[Path]:
    """NIfTI CTs in ``folder`` (sorted by name): they join the anatomy pool."""
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"phantom root {folder} is not a folder: give a folder of NIfTI chest CTs or no root")
    return sorted(p for p in folder.iterdir() if p.name.endswith(CT_SUFFIXES) and p.is_file())


@functools.lru_cache(maxsize=4)
def anatomy_pool(ct: str | None, extra_folder: str | None) -> tuple[BaseAnatomy, ...]:
    """The pool for a source: the main CT (``ct`` or the default) plus any CTs in ``extra_folder``."""
    paths = [phantom_ct_path(ct)] + extra_cts(extra_folder)
    pool = []
    for path in paths:
        arrays, sha = load_layers(path)
        pool.append(BaseAnatomy.from_layers(arrays, name=f"{Path(path).name}:{sha[:12]}"))
    return tuple(pool)


def pool_identity(ct: str | None, extra_folder: str | None) -> list[str]:
    """Names with content hashes of the pool's CTs (goes into the index fingerprint)."""
    return [b.name for b in anatomy_pool(ct, extra_folder)]
