"""The interface every data source implements, and the registry that names them.

A source turns something on disk (or a renderer, for ``phantom``) into

1. an index (:meth:`Source.build_index`, schema in :mod:`cxrtune.data.index`),
2. pixels for the uint8 cache (:meth:`Source.read_images`), and
3. a few-shot task pool (:meth:`Source.task_pool`): which labels become binary tasks and which
   images are their positives and negatives, by split.

Adding a source is subclassing :class:`Source` and decorating it with :func:`register_source`.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import pandas as pd

from cxrtune.data.imageio import load_grey_square
from cxrtune.data.index import INDEX_COLUMNS, index_digest
from cxrtune.errors import DataError

_REGISTRY: dict[str, type["Source"]] = {}


def register_source(cls: type["Source"]) -> type["Source"]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} must set a class attribute `name`")
    _REGISTRY[cls.name] = cls
    return cls


def source_names() -> list[str]:
    _load_builtin_sources()
    return sorted(_REGISTRY)


def make_source(name: str, root: str | Path | None = None, **options: Any) -> "Source":
    """Instantiate the source registered as ``name``."""
    _load_builtin_sources()
    if name not in _REGISTRY:
        raise DataError(f"source = {name!r} is not known: use one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](root=root, **options)


def _load_builtin_sources() -> None:
    # Imported lazily so that `cxrtune.data.sources.base` has no import cycle with the sources.
    import importlib

    for module in ("nih", "padchest", "csv", "phantom"):
        try:
            importlib.import_module(f"cxrtune.data.sources.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cxrtune.data.sources.{module}":
                raise


class Source(ABC):
    """A chest X-ray archive (or generator) that can be indexed and cached."""

    name: ClassVar[str] = ""
    #: True when pixels come from files listed in ``path`` (decoded by :meth:`read_images`).
    file_based: ClassVar[bool] = True

    def __init__(self, root: str | Path | None = None, **options: Any) -> None:
        self.root = Path(root).expanduser().resolve() if root is not None else None
        self.options = dict(options)

    # -- index ------------------------------------------------------------------------------
    @abstractmethod
    def build_index(self) -> pd.DataFrame:
        """Return a validated index (see :func:`cxrtune.data.index.validate_index`)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of this source: stored in index and cache metadata."""
        return {"source": self.name, "root": str(self.root) if self.root else None, **self.options}

    def fingerprint(self, index: pd.DataFrame) -> str:
        """Content fingerprint for cache keys: the index plus each file's size and mtime.

        Changing, adding or removing an image (or a label) changes the fingerprint, so a cache
        built from an older state of the source is rebuilt rather than reused.
        """
        h = hashlib.sha256()
        h.update(index_digest(index).encode())
        h.update(repr(sorted((k, str(v)) for k, v in self.describe().items())).encode())
        if self.file_based:
            for p in index["path"]:
                try:
                    st = os.stat(p)
                    h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
                except OSError:
                    h.update(b"missing;")
        return h.hexdigest()[:16]

    # -- pixels -----------------------------------------------------------------------------
    def read_images(self, rows: pd.DataFrame, size: int, fit: str = "crop") -> list[np.ndarray | DataError]:
        """Return one ``size`` x ``size`` uint8 array per row, or the :class:`DataError` that
        explains why that row could not be read (the cache builder decides to skip or fail)."""
        out: list[np.ndarray | DataError] = []
        for path in rows["path"]:
            try:
                out.append(load_grey_square(path, size, fit))
            except DataError as err:
                out.append(err)
        return out

    def write_extras(self, cache_dir: Path, index: pd.DataFrame, size: int, fit: str = "crop") -> None:
        """Write per-image side data (e.g. phantom's ground-truth masks) into a cache being built.

        Called by the cache builder after the images, inside the temporary folder that is renamed
        into place only when everything succeeded. ``index`` holds the cached rows in cache order
        (column ``cache_row``). File sources have nothing to add.
        """

    # -- few-shot tasks -----------------------------------------------------------------------
    def task_pool(self, index: pd.DataFrame, **options: Any):
        """The binary few-shot tasks this source defines (see :mod:`cxrtune.data.tasks`)."""
        from cxrtune.data.tasks import build_task_pool

        return build_task_pool(index, **options)


def check_columns(df: pd.DataFrame, required: Sequence[str], what: str) -> None:
    """Raise a :class:`DataError` naming the file and the missing header fields."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{what} lacks the column(s) {missing}; expected a header with {list(required)} "
            f"but found {list(df.columns)}"
        )


def require_dir(path: Path | None, what: str) -> Path:
    if path is None:
        raise DataError(f"{what}: no root folder given; pass --root PATH")
    if not path.is_dir():
        raise DataError(f"{what}: root folder {path} does not exist or is not a folder")
    return path


def resolve_missing(index: pd.DataFrame, allow_missing: bool, what: str,
                    exists: Callable[[str], bool] = os.path.isfile) -> pd.DataFrame:
    """Drop rows whose image is not on disk when ``allow_missing``, else raise listing them."""
    present = index["path"].map(exists)
    n_missing = int((~present).sum())
    if n_missing == 0:
        return index
    if not allow_missing:
        examples = ", ".join(index.loc[~present, "path"].head(3))
        raise DataError(
            f"{what}: {n_missing} of {len(index)} listed images are missing on disk (e.g. {examples}); "
            "fix the folder, or set allow_missing (--allow-missing on the command line) to index only the images present"
        )
    return index.loc[present].reset_index(drop=True)


__all__ = [
    "INDEX_COLUMNS",
    "Source",
    "check_columns",
    "make_source",
    "register_source",
    "require_dir",
    "resolve_missing",
    "source_names",
]
