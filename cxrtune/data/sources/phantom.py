"""``phantom``: the embedded default dataset, rendered from a chest CT (no download of images).

See :mod:`cxrtune.data.phantom` for the renderer and :class:`PhantomConfig` for every default.
The index is computed once per configuration (its ground-truth boxes need the masks) and kept in
``<cache_root>/phantom/index-<key>.parquet``; later runs read it back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrtune.data.index import read_index, validate_index, write_index
from cxrtune.data.phantom.anatomy import anatomy_pool, pool_identity
from cxrtune.data.phantom.builder import PhantomConfig, Renderer, add_boxes, plan_rows
from cxrtune.data.phantom.ct import cache_root
from cxrtune.data.phantom.findings import FINDINGS, NORMAL
from cxrtune.data.phantom.segment import SEGMENT_VERSION
from cxrtune.data.sources.base import Source, register_source
from cxrtune.errors import DataError

#: Version of the dataset layout and renderer: part of every cache key.
PHANTOM_VERSION = 6
MASKS_FILE = "masks.bits"


@register_source
class PhantomSource(Source):
    name = "phantom"
    file_based = False

    def __init__(self, root: str | Path | None = None, **options: Any) -> None:
        super().__init__(root=root, **options)
        self.config = PhantomConfig.from_dict(options)
        self._renderer: Renderer | None = None

    # Workers receive the source by pickle: send the options, not the loaded anatomy.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_renderer"] = None
        return state

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "root": str(self.root) if self.root else None,
                "version": PHANTOM_VERSION, "segment_version": SEGMENT_VERSION, **self.config.to_dict()}

    @property
    def renderer(self) -> Renderer:
        if self._renderer is None:
            self._renderer = Renderer(anatomy_pool(self.config.ct, str(self.root) if self.root else None))
        return self._renderer

    def _index_path(self) -> Path:
        ident = {**self.describe(), "pool": pool_identity(self.config.ct, str(self.root) if self.root else None)}
        key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cache_root() / "phantom" / f"index-{key}.parquet"

    def build_index(self) -> pd.DataFrame:
        path = self._index_path()
        if path.is_file():
            return validate_index(read_index(path), source=self.name)
        pool = self.renderer.pool
        df = plan_rows(self.config, n_anatomies=len(pool))
        df = add_boxes(df, self.renderer)
        df = validate_index(df, source=self.name)
        write_index(df, path, metadata=self.describe())
        return df

    def read_images(self, rows: pd.DataFrame, size: int, fit: str = "crop") -> list[np.ndarray | DataError]:
        r = self.renderer
        return [r.render(row, size) for row in rows.itertuples(index=False)]

    def render_masks(self, rows: pd.DataFrame, size: int) -> np.ndarray:
        """Ground-truth masks (bool, len(rows) x size x size) of ``rows``."""
        r = self.renderer
        out = np.zeros((len(rows), size, size), bool)
        for i, row in enumerate(rows.itertuples(index=False)):
            if row.finding != NORMAL:
                out[i] = r.mask(row, size)
        return out

    def write_extras(self, cache_dir: Path, index: pd.DataFrame, size: int, fit: str = "crop") -> None:
        """``masks.bits``: N x ceil(S*S/8) bytes, each row the packed bits of the image's finding
        mask (cache order); read it with :func:`load_masks`."""
        n_bytes = (size * size + 7) // 8
        path = Path(cache_dir) / MASKS_FILE
        packed = np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(len(index), 1), n_bytes))
        r = self.renderer
        ordered = index.sort_values("cache_row") if "cache_row" in index.columns else index
        for i, row in enumerate(ordered.itertuples(index=False)):
            if row.finding != NORMAL:
                packed[i] = np.packbits(r.mask(row, size).ravel())
        packed.flush()
        del packed

    def task_pool(self, index: pd.DataFrame, **options: Any):
        few = index[index["subset"] == "fewshot"] if "subset" in index.columns else index
        opts = {"exclude": (NORMAL,), "min_train": 1, "min_val": 1, "max_train_neg": None, "max_val_neg": None}
        opts.update(options)
        return self.build_pool(few, **opts)


def load_masks(cache, rows: np.ndarray | None = None) -> np.ndarray:
    """The ground-truth masks of a phantom cache (bool, N x S x S, cache order), or of the given
    cache ``rows`` only."""
    size = int(cache.size)
    path = Path(cache.path) / MASKS_FILE
    if not path.is_file():
        raise DataError(f"cache {cache.path} has no {MASKS_FILE}: it was not built from the phantom source")
    n_bytes = (size * size + 7) // 8
    packed = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, n_bytes)
    sel = packed if rows is None else packed[np.asarray(rows)]
    bits = np.unpackbits(np.asarray(sel), axis=1)[:, : size * size]
    return bits.reshape(-1, size, size).astype(bool)


__all__ = ["FINDINGS", "PhantomConfig", "PhantomSource", "load_masks"]
