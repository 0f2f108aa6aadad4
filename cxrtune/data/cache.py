"""The uint8 image cache: every image decoded once into one read-only memmap.

Why: decoding PNGs is what starves the accelerator. The study's uint8 RAM cache of all NIH images
(112,120 x 256 x 256, ~7 GB) raised GPU use from ~60% to ~95%. Here the cache is a file, so the
operating system's page cache holds it once and every process that maps it shares those pages.

Layout, beside the Parquet index of the cached rows::

    <cache_root>/<source name>/<fingerprint>-s<size>-<fit>/
        index.parquet   the cached rows in cache order, column ``cache_row`` (0 .. N-1)
        images.u8       raw uint8, N x S x S, C order (row i is ``cache_row`` i)
        cache.json      what was built from what, what was skipped and why, and which cached
                        images look wrong (``flagged``: every pixel equal, e.g. a 1 x 1 or blank file)

The key holds the source's content fingerprint (index, options, each file's size and mtime), so a
changed source builds a new cache instead of reusing a stale one.

Atomicity: a cache is built inside a sibling folder ``<key>.partial-<random>`` and renamed into
place only when complete, so a cache is complete exactly when its final folder exists (and holds
``cache.json``). A killed build leaves only a partial folder, which later builds ignore and remove
once no live process holds its ``.lock`` file. When two processes build the same key at once, the
one whose rename loses discards its copy and opens the winner's.

Sharing: :class:`ImageCache` pickles as its path (a few hundred bytes); the receiving process maps
the same file read-only, so many data-loading processes read the same pages without copies.

This module holds the reader (:class:`ImageCache`, :func:`find_caches`, :func:`cache_summary`)
and the entry points (:func:`build_cache`, :func:`get_cache`); the build itself is in
``cache_build``, the decoding processes in ``cache_decode`` and the on-disk rules in ``cache_disk``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cxrtune.config import Config, param
from cxrtune.data.cache_build import build_new, flagged_message, format_bytes
from cxrtune.data.cache_decode import MAX_CHUNK_ROWS, START_METHOD
from cxrtune.data.cache_disk import (
    FORMAT_VERSION,
    IMAGES_FILE,
    INDEX_FILE,
    PARTIAL,
    REPORT_FILE,
    STALE,
    cache_key,
    remove_abandoned,
)
from cxrtune.data.imageio import FITS
from cxrtune.data.index import read_index, validate_index
from cxrtune.data.sources.base import Source
from cxrtune.errors import DataError

log = logging.getLogger(__name__)

#: Below this many images the default is to decode in-process: starting a 'spawn' worker costs
#: ~0.7 CPU s (imports; 1-2 s of wall time on a busy machine), as much as decoding ~50 images
#: (bench/cache_build.py: 64 images build 2.2-2.5x faster end to end on one worker than on two).
SMALL_BUILD_ROWS = 256


class FlatImageWarning(UserWarning):
    """Cached images whose pixels are all equal (a 1 x 1, blank or constant file): they are kept
    in the cache, flat black, and listed under ``flagged`` in ``cache.json``."""


def cache_root() -> Path:
    """Where caches live: ``$CXRTUNE_CACHE`` or ``~/.cache/cxrtune``."""
    env = os.environ.get("CXRTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cxrtune"


@dataclasses.dataclass
class CacheConfig(Config):
    """How a cache is built. Every default of :func:`build_cache` is here."""

    size: int = param(256, low=8, high=4096, doc="side in pixels of the cached square images")
    fit: str = param("crop", choices=FITS, doc="how a non-square image becomes square")
    workers: int | None = param(
        None, low=1, doc="decoding processes; None = min(2, CPU count), or 1 below SMALL_BUILD_ROWS images"
    )
    strict: bool = param(False, doc="fail on the first unreadable image instead of skipping it")
    allow_missing: bool = param(
        False, doc="skip (and list) indexed images missing on disk instead of failing"
    )

    def resolved_workers(self, n_rows: int) -> int:
        if self.workers is not None:
            return self.workers
        if n_rows < SMALL_BUILD_ROWS:
            return 1
        return max(1, min(2, os.cpu_count() or 1))


# -------------------------------------------------------------------------------------------
# Opening a cache
# -------------------------------------------------------------------------------------------


class ImageCache:
    """A complete cache, opened read-only.

    ``images`` is an ``np.memmap`` (mode ``'r'``) of shape ``(N, S, S)``: writing to it raises.
    ``index`` (loaded on first use) holds the cached rows in cache order with ``cache_row``.
    Pickling sends only the path: the receiving process maps the same file. Do not pickle
    ``cache.images`` itself; numpy would copy the whole array.
    """

    def __init__(self, path: Path, report: dict[str, Any], images: np.memmap) -> None:
        self.path = path
        self.report = report
        self.images = images
        self._index: pd.DataFrame | None = None
        self._row_of_id: pd.Index | None = None

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "ImageCache":
        """Open a complete cache folder, checking its report and file sizes first."""
        path = Path(path).expanduser().resolve()  # absolute: pickles stay valid in any cwd
        report = _read_report(path)
        n, size = report["n"], report["size"]
        images_path = path / IMAGES_FILE
        expected = n * size * size
        actual = images_path.stat().st_size if images_path.is_file() else None
        if actual != expected:
            found = "is missing" if actual is None else f"holds {actual:,} bytes"
            raise DataError(
                f"{images_path} {found} but {REPORT_FILE} lists {n:,} images of {size} x {size} "
                f"= {expected:,} bytes: the cache is damaged; delete {path} or rebuild it "
                "(build_cache(..., rebuild=True) / `--rebuild`)"
            )
        index_path = path / INDEX_FILE
        rows = pq.read_metadata(index_path).num_rows if index_path.is_file() else None
        if rows != n:
            found = "is missing" if rows is None else f"has {rows:,} rows"
            raise DataError(
                f"{index_path} {found} but {REPORT_FILE} lists {n:,} images: the cache is damaged; "
                f"delete {path} or rebuild it (build_cache(..., rebuild=True) / `--rebuild`)"
            )
        images = np.memmap(images_path, dtype=np.uint8, mode="r", shape=(n, size, size))
        return cls(path, report, images)

    def __reduce__(self):
        return (_reopen, (str(self.path), self.report["build_id"]))

    # -- contents ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self.report["size"])

    @property
    def fit(self) -> str:
        return str(self.report["fit"])

    @property
    def fingerprint(self) -> str:
        return str(self.report["fingerprint"])

    @property
    def index(self) -> pd.DataFrame:
        if self._index is None:
            self._index = read_index(self.path / INDEX_FILE)
        return self._index

    def __len__(self) -> int:
        return int(self.report["n"])

    def rows_for(self, image_ids: Iterable[str]) -> np.ndarray:
        """Cache rows of ``image_ids`` (in the order given), for indexing ``images``."""
        if self._row_of_id is None:
            self._row_of_id = pd.Index(self.index["image_id"].astype(str))
        ids = [str(i) for i in image_ids]
        positions = self._row_of_id.get_indexer(ids)
        unknown = np.flatnonzero(positions < 0)
        if len(unknown):
            first = ids[unknown[0]]
            skipped = {s["image_id"] for s in self.report.get("skipped", [])}
            why = (
                "it was skipped when the cache was built (see skipped in "
                f"{self.path / REPORT_FILE})" if first in skipped else "it is not in the cached index"
            )
            raise DataError(
                f"image_id {first!r} ({len(unknown)} of {len(ids)} requested ids unknown) has no row "
                f"in the cache {self.path}: {why}"
            )
        return self.index["cache_row"].to_numpy(dtype=np.int64)[positions]

    def __repr__(self) -> str:
        s = self.size
        return f"ImageCache({len(self):,} x {s} x {s} from {self.report['source'].get('source')}, {self.path})"


def _reopen(path: str, build_id: str) -> ImageCache:
    cache = ImageCache.open(path)
    if cache.report.get("build_id") != build_id:
        raise DataError(
            f"the cache at {path} was rebuilt after this handle was made (build {build_id} is now "
            f"{cache.report.get('build_id')}); open it again with ImageCache.open"
        )
    return cache


def _read_report(path: Path) -> dict[str, Any]:
    report_path = path / REPORT_FILE
    if not report_path.is_file():
        raise DataError(
            f"{path} is not a complete image cache: {REPORT_FILE} is missing "
            "(a build was interrupted, or this is not a cache folder); build it with build_cache "
            "/ `cxrtune data cache`"
        )
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{report_path} is not readable JSON ({exc}); delete {path} and rebuild") from exc
    if report.get("format") != FORMAT_VERSION:
        raise DataError(
            f"{report_path} has cache format {report.get('format')!r}; this cxrtune reads format "
            f"{FORMAT_VERSION}: delete {path} and rebuild"
        )
    missing = [k for k in ("n", "size", "fit", "fingerprint", "source", "build_id") if k not in report]
    if missing:
        raise DataError(f"{report_path} lacks the field(s) {missing}: delete {path} and rebuild")
    return report


# -------------------------------------------------------------------------------------------
# Building a cache
# -------------------------------------------------------------------------------------------


def build_cache(
    source: Source,
    size: int = 256,
    fit: str = "crop",
    workers: int | None = None,
    strict: bool = False,
    index: pd.DataFrame | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    rebuild: bool = False,
    allow_missing: bool = False,
) -> ImageCache:
    """Decode ``source`` once into a uint8 cache, or open the complete cache it already has.

    ``index`` defaults to ``source.build_index()``; ``cache_dir`` to :func:`cache_root`.
    Unreadable images are skipped and listed in ``cache.json`` (``strict=True`` raises on the
    first instead); images listed but missing on disk fail the build unless ``allow_missing``.
    ``rebuild=True`` replaces an existing cache of the same key.
    """
    config = CacheConfig(size=size, fit=fit, workers=workers, strict=strict, allow_missing=allow_missing)
    if index is None:
        index = source.build_index()
    else:
        index = validate_index(index.drop(columns=["cache_row"], errors="ignore").copy(), source=source.name)
    if len(index) == 0:
        raise DataError(f"source {source.name!r}: the index has no rows; there is nothing to cache")
    fingerprint = source.fingerprint(index)
    parent = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    parent = parent / source.name
    final = parent / cache_key(fingerprint, config.size, config.fit)
    if not rebuild and (final / REPORT_FILE).is_file():
        log.info("reusing the image cache at %s", final)
        return _checked_reuse(final, config)
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(parent)
    published, flagged = build_new(source, index, fingerprint, final, config, progress, replace=rebuild)
    if not published:
        log.info("another process finished %s first; using its cache", final)
        return _checked_reuse(final, config)
    if flagged:
        message = flagged_message(flagged, final / REPORT_FILE)
        log.warning("%s", message)
        warnings.warn(message, FlatImageWarning, stacklevel=2)
    return ImageCache.open(final)


def get_cache(
    source: Source | str,
    root: str | Path | None = None,
    *,
    source_options: dict[str, Any] | None = None,
    **build_options: Any,
) -> ImageCache:
    """The cache of ``source`` (an instance or a registered name), built on first use.

    ``get_cache("nih", "/data/nih", size=256)`` is ``build_cache(make_source("nih", "/data/nih"),
    size=256)``: a complete cache with the same key is opened, never rebuilt.
    """
    if isinstance(source, str):
        from cxrtune.data.sources.base import make_source

        source = make_source(source, root, **(source_options or {}))
    elif root is not None or source_options:
        raise DataError("get_cache: pass root and source_options only with a source name, not a Source")
    return build_cache(source, **build_options)


def _checked_reuse(final: Path, config: CacheConfig) -> ImageCache:
    cache = ImageCache.open(final)
    skipped = cache.report.get("skipped", [])
    if config.strict and skipped:
        first = skipped[0]
        raise DataError(
            f"strict=True, but the existing cache {final} skipped {len(skipped)} image(s), e.g. "
            f"{first['path'] or first['image_id']}: {first['reason']}; fix or remove those files "
            "(the source fingerprint then changes and a new cache is built)"
        )
    return cache


# -------------------------------------------------------------------------------------------
# Listing and describing caches
# -------------------------------------------------------------------------------------------


def find_caches(source_name: str | None = None, cache_dir: str | Path | None = None) -> list[Path]:
    """Folders of complete caches under ``cache_dir`` (default :func:`cache_root`), sorted."""
    root = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()).resolve()
    pattern = f"{source_name}/*/{REPORT_FILE}" if source_name else f"*/*/{REPORT_FILE}"
    found = []
    for report in root.glob(pattern):
        folder = report.parent
        if PARTIAL in folder.name or STALE in folder.name:
            continue
        found.append(folder)
    return sorted(found)


def cache_summary(cache: ImageCache | str | Path) -> str:
    """A few human-readable lines about one cache (for ``cxrtune data info``).

    Takes an open cache or a folder (as :func:`find_caches` lists them); a folder that does not
    open is summarised by the reason, so one damaged cache does not hide the others.
    """
    if not isinstance(cache, ImageCache):
        try:
            cache = ImageCache.open(cache)
        except DataError as err:
            return f"path     {cache}\nunusable {err}"
    report = cache.report
    source = report["source"]
    options = ", ".join(f"{k}={v}" for k, v in source.items() if k != "source" and v is not None)
    counts = report.get("counts", {})
    skipped = counts.get("skipped", len(report.get("skipped", [])))
    megabytes = (cache.path / IMAGES_FILE).stat().st_size / 2**20
    lines = [
        f"source   {source.get('source')}" + (f" ({options})" if options else ""),
        f"images   {len(cache):,} cached of {counts.get('listed', len(cache)):,} indexed, "
        f"{skipped:,} skipped" + (f" (listed in {REPORT_FILE})" if skipped else ""),
        f"size     {cache.size} x {cache.size} px uint8, fit {cache.fit}",
        f"disk     {megabytes:,.1f} MB",
        f"path     {cache.path}",
        f"built    {report.get('created', '?')} in {report.get('build_seconds', '?')} s "
        f"with {report.get('workers', '?')} worker(s)",
    ]
    flagged = report.get("flagged", [])
    if flagged:
        first = flagged[0]
        lines.append(
            f"flagged  {len(flagged):,} image(s) with every pixel equal, cached flat black (listed in "
            f"{REPORT_FILE}), e.g. {first['path'] or first['image_id']}: {first['reason']}"
        )
    return "\n".join(lines)


__all__ = [
    "CacheConfig",
    "FORMAT_VERSION",
    "FlatImageWarning",
    "IMAGES_FILE",
    "INDEX_FILE",
    "ImageCache",
    "MAX_CHUNK_ROWS",
    "REPORT_FILE",
    "SMALL_BUILD_ROWS",
    "START_METHOD",
    "build_cache",
    "cache_key",
    "cache_root",
    "cache_summary",
    "find_caches",
    "flagged_message",
    "format_bytes",
    "get_cache",
    "remove_abandoned",
]
