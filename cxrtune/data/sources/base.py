"""The interface every data source implements, and the registry that names them.

A source turns something on disk (or a renderer, for ``phantom``) into

1. an index (:meth:`Source.build_index`, schema in :mod:`cxrtune.data.index`),
2. pixels for the uint8 cache (:meth:`Source.read_images`), and
3. a few-shot task pool (:meth:`Source.task_pool`): which labels become binary tasks and which
   images are their positives and negatives, by split.

Adding a source is subclassing :class:`Source` and decorating it with :func:`register_source`.

Options every source takes, parsed here rather than by each source:

- ``no_finding``: the labels that mean "no finding" (a negative for every task, never a task);
  ``""`` stands for an empty label and for an image without any label. Default
  :attr:`Source.no_finding_default` (:data:`cxrtune.data.tasks.DEFAULT_NO_FINDING` unless a source
  says otherwise), e.g. ``make_source("csv", root, no_finding=["No Finding", ""])`` or
  ``-o 'no_finding=["No Finding", ""]'`` on the command line. It shapes the task pool only, so it
  is not part of the cache key.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import os
from abc import ABCMeta, abstractmethod
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


def _default_no_finding() -> tuple[str, ...]:
    from cxrtune.data.tasks import DEFAULT_NO_FINDING

    return DEFAULT_NO_FINDING


def no_finding_labels(value: Any, source: str) -> tuple[str, ...]:
    """The ``no_finding`` option as a tuple of stripped labels (a single string is one label)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(x, str) for x in value):
        raise DataError(
            f"{source}: no_finding = {value!r} is not valid: use a list of labels, e.g. "
            '["No Finding", "Normal", ""] ("" means an empty label or no label at all)'
        )
    return tuple(dict.fromkeys(x.strip() for x in value))


class _SourceMeta(ABCMeta):
    """Takes the options every source shares (``no_finding``) out of the keyword arguments
    before the source's own ``__init__`` validates the rest, so that no source declares them."""

    def __call__(cls, *args: Any, **options: Any):
        no_finding = options.pop("no_finding", None)
        source = super().__call__(*args, **options)
        if no_finding is not None:
            source.no_finding = no_finding_labels(no_finding, cls.name)
        return source


class Source(metaclass=_SourceMeta):
    """A chest X-ray archive (or generator) that can be indexed and cached."""

    name: ClassVar[str] = ""
    #: True when pixels come from files listed in ``path`` (decoded by :meth:`read_images`).
    file_based: ClassVar[bool] = True
    #: The ``no_finding`` labels of a source built without that option (None: the tasks module's
    #: :data:`~cxrtune.data.tasks.DEFAULT_NO_FINDING`).
    no_finding_default: ClassVar[tuple[str, ...] | None] = None
    #: Keyword arguments :meth:`task_pool` takes beyond :func:`~cxrtune.data.tasks.build_task_pool`'s.
    extra_task_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path | None = None, **options: Any) -> None:
        self.root = resolve_path(root, f"{self.name}: root") if root is not None else None
        self.options = dict(options)

    @property
    def no_finding(self) -> tuple[str, ...]:
        """The labels that mean "no finding" for this source's task pool (option ``no_finding``)."""
        own = self.__dict__.get("_no_finding")
        if own is not None:
            return own
        default = type(self).no_finding_default
        return _default_no_finding() if default is None else tuple(default)

    @no_finding.setter
    def no_finding(self, value: tuple[str, ...]) -> None:
        self.__dict__["_no_finding"] = tuple(value)

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
        return self.build_pool(index, **options)

    @classmethod
    def task_option_names(cls) -> list[str]:
        """The keyword arguments :meth:`task_pool` accepts (for checking user-given options)."""
        from cxrtune.data.tasks import build_task_pool

        names = [n for n in inspect.signature(build_task_pool).parameters if n != "index"]
        return sorted(set(names) | set(cls.extra_task_options))

    def build_pool(self, index: pd.DataFrame, **options: Any):
        """:func:`~cxrtune.data.tasks.build_task_pool` with this source's ``no_finding`` labels
        (an explicit ``no_finding`` option wins); unknown options are refused by name."""
        from cxrtune.data.tasks import build_task_pool

        valid = [n for n in type(self).task_option_names() if n not in type(self).extra_task_options]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise DataError(
                f"{self.name}: task pool option {unknown[0]!r} is not known: use one of "
                f"{', '.join(type(self).task_option_names())}"
            )
        if "no_finding" in options:
            options["no_finding"] = no_finding_labels(options["no_finding"], self.name)
        else:
            options["no_finding"] = self.no_finding
        return build_task_pool(index, **options)


def check_columns(df: pd.DataFrame, required: Sequence[str], what: str) -> None:
    """Raise a :class:`DataError` naming the file and the missing header fields."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{what} lacks the column(s) {missing}; expected a header with {list(required)} "
            f"but found {list(df.columns)}"
        )


def resolve_path(path: str | Path, what: str) -> Path:
    """``Path(path).expanduser().resolve()``, with a symbolic link loop reported as a
    :class:`DataError` naming ``what`` instead of a RuntimeError traceback."""
    path = Path(path).expanduser()
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        loop = isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP
        why = ("is a symbolic link loop (following it leads back to itself)" if loop
               else f"cannot be resolved ({type(exc).__name__}: {exc})")
        raise DataError(f"{what} {path} {why}; point it at a real folder or file") from None


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
    "no_finding_labels",
    "require_dir",
    "resolve_missing",
    "resolve_path",
    "source_names",
]
