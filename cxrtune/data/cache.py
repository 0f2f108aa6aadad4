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
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as _dt
import errno
import json
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import threading
import time
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm import tqdm

from cxrtune.config import Config, param
from cxrtune.data.imageio import FITS
from cxrtune.data.index import read_index, validate_index, write_index
from cxrtune.data.sources.base import Source
from cxrtune.data.sources.files import link_loop
from cxrtune.errors import DataError

try:  # advisory locks tell a live build's partial folder from an abandoned one
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGES_FILE = "images.u8"
INDEX_FILE = "index.parquet"
REPORT_FILE = "cache.json"
_PARTIAL = ".partial-"
_STALE = ".stale-"
_LOCK_SUFFIX = ".lock"
#: Without flock (non-POSIX), a partial folder this old is taken as abandoned.
_ABANDONED_AFTER_S = 24 * 3600
#: 'spawn' is safe whatever the parent holds (threads, CUDA, a tqdm monitor) and works the same
#: on every platform; its start-up cost (~1 s per worker) is small next to decoding an archive.
START_METHOD = "spawn"
#: Rows per decoding task: small enough for an even load and a live progress bar, large enough
#: that the per-task cost (pickling the rows, one round trip) stays negligible.
MAX_CHUNK_ROWS = 64
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


def cache_key(fingerprint: str, size: int, fit: str) -> str:
    return f"{fingerprint}-s{size}-{fit}"


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
    return _build_new(source, index, fingerprint, final, config, progress, replace=rebuild)


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
    build_options.setdefault("rebuild", False)
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


def _build_new(
    source: Source,
    index: pd.DataFrame,
    fingerprint: str,
    final: Path,
    config: CacheConfig,
    progress: bool,
    replace: bool,
) -> ImageCache:
    started = time.perf_counter()
    size = config.size
    index = index.drop(columns=["cache_row"], errors="ignore").reset_index(drop=True)
    todo, skipped = _drop_missing(source, index, config.allow_missing)
    _check_free_space(final.parent, len(todo) * size * size)
    workers = config.resolved_workers(len(todo))

    partial = final.with_name(f"{final.name}{_PARTIAL}{uuid.uuid4().hex[:12]}")
    lock_fd = _hold_lock(partial.with_name(partial.name + _LOCK_SUFFIX))
    try:
        partial.mkdir()
        images_path = partial / IMAGES_FILE
        with open(images_path, "wb") as f:
            f.truncate(len(todo) * size * size)
        shape = (len(todo), size, size)
        failures, flat, used_workers, timing = _decode_all(source, todo, images_path, shape, config, workers,
                                                           progress)
        kept = np.array([p for p in range(len(todo)) if p not in failures], dtype=np.int64)
        skipped += [_skip_entry(todo.iloc[p], reason) for p, reason in sorted(failures.items())]
        flagged = [_flag_entry(source, todo.iloc[p], value) for p, value in sorted(flat.items())]
        if len(kept) == 0:
            examples = "; ".join(s["reason"] for s in skipped[:3])
            raise DataError(
                f"source {source.name!r}: none of the {len(index):,} indexed images could be read "
                f"(e.g. {examples}); no cache was written"
            )
        if len(kept) < len(todo):
            _compact(images_path, shape, kept)
        cached = todo.iloc[kept].reset_index(drop=True)
        cached["cache_row"] = np.arange(len(cached), dtype=np.int64)
        meta = {"source": source.describe(), "fingerprint": fingerprint, "size": size, "fit": config.fit}
        write_index(cached, partial / INDEX_FILE, metadata=meta)
        source.write_extras(partial, cached, size, config.fit)
        _fsync_file(images_path)
        timing["build_seconds"] = round(time.perf_counter() - started, 3)
        report = _build_report(meta, len(index), len(cached), skipped, used_workers, timing, flagged)
        _write_json_durably(partial / REPORT_FILE, report)
        published = _publish(partial, final, replace)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        _release_lock(lock_fd, partial.with_name(partial.name + _LOCK_SUFFIX))
    if not published:
        log.info("another process finished %s first; using its cache", final)
        return _checked_reuse(final, config)
    if flagged:
        message = flagged_message(flagged, final / REPORT_FILE)
        log.warning("%s", message)
        warnings.warn(message, FlatImageWarning, stacklevel=3)
    return ImageCache.open(final)


def flagged_message(flagged: list[dict[str, str]], report_path: Path | str) -> str:
    """One sentence on the flagged images of a cache, with the first few named."""
    examples = "; ".join(f"{f['path'] or f['image_id']} ({f['reason']})" for f in flagged[:3])
    more = f" and {len(flagged) - 3} more" if len(flagged) > 3 else ""
    return (
        f"{len(flagged)} cached image(s) have every pixel equal, so they are cached flat black and "
        f"carry nothing to learn from: {examples}{more}; they are kept, and listed under flagged in "
        f"{report_path}; check or remove those files"
    )


def _build_report(meta: dict[str, Any], n_listed: int, n_cached: int, skipped: list[dict[str, str]],
                  workers: int, timing: dict[str, float],
                  flagged: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The content of ``cache.json``; its presence in the final folder marks a complete cache."""
    size = meta["size"]
    return {
        "format": FORMAT_VERSION,
        **meta,
        "n": n_cached,
        "shape": [n_cached, size, size],
        "dtype": "uint8",
        "build_id": uuid.uuid4().hex,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "counts": {
            "listed": n_listed,
            "cached": n_cached,
            "skipped": len(skipped),
            "missing": sum(s["kind"] == "missing" for s in skipped),
            "unreadable": sum(s["kind"] == "unreadable" for s in skipped),
            "flagged": len(flagged or ()),
        },
        "skipped": skipped,
        "flagged": list(flagged or ()),
        "workers": workers,
        **timing,
    }


def _skip_entry(row: pd.Series, reason: str, kind: str = "unreadable") -> dict[str, str]:
    return {"image_id": str(row["image_id"]), "path": str(row["path"]), "kind": kind, "reason": reason}


def _flag_entry(source: Source, row: pd.Series, value: int) -> dict[str, str]:
    """``flagged`` entry of an image cached with every pixel equal to ``value``."""
    reason = f"every pixel of the cached image is {value}"
    if source.file_based and row["path"]:
        try:
            from PIL import Image

            with Image.open(row["path"]) as im:
                width, height = im.size
            reason = f"the file is {width} x {height} px and " + (
                "holds one pixel" if width * height == 1 else "every pixel has the same value")
        except Exception:  # the header read is only for the message
            pass
    return {"image_id": str(row["image_id"]), "path": str(row["path"]), "kind": "flat", "reason": reason}


def _drop_missing(source: Source, index: pd.DataFrame, allow_missing: bool) -> tuple[pd.DataFrame, list]:
    """Check every listed file exists before decoding anything (fails fast, in seconds)."""
    if not source.file_based:
        return index, []
    present = index["path"].map(os.path.isfile).to_numpy(dtype=bool)
    if present.all():
        return index, []
    # A symbolic link loop is there, just unreadable: decoding fails and lists it as unreadable.
    present = np.array([ok or link_loop(p) for ok, p in zip(present, index["path"])], dtype=bool)
    if present.all():
        return index, []
    missing = index.loc[~present]
    if not present.any() or not allow_missing:
        examples = ", ".join(missing["path"].head(3))
        raise DataError(
            f"source {source.name!r}: {len(missing):,} of {len(index):,} indexed images are missing on "
            f"disk (e.g. {examples}); restore them, rebuild the index (`cxrtune data index`, with "
            "--allow-missing to drop them), or pass allow_missing=True to skip them in the cache"
        )
    skipped = [
        _skip_entry(row, f"image file {row['path']} does not exist", kind="missing")
        for _, row in missing.iterrows()
    ]
    return index.loc[present].reset_index(drop=True), skipped


def _check_free_space(folder: Path, needed: int) -> None:
    # A memmap write past the free space kills the writer with SIGBUS: refuse up front instead.
    free = shutil.disk_usage(folder).free
    if needed > free:
        need_text, free_text = format_bytes(needed), format_bytes(free)
        if need_text == free_text:  # e.g. 1.0 MB and 1.0 MB: the exact counts show the gap
            need_text, free_text = f"{needed:,} bytes", f"{free:,} bytes"
        raise DataError(
            f"the image cache needs {need_text} in {folder} but only {free_text} "
            f"{'is' if free == 1 else 'are'} free; free some space or point CXRTUNE_CACHE (or cache_dir) "
            "at a larger disk"
        )


def format_bytes(n: int) -> str:
    """A byte count in the unit that shows it: ``0 bytes``, ``512 bytes``, ``410 KB``, ``3.2 MB``,
    ``12 GB`` (decimal units; one decimal below 10)."""
    n = int(n)
    if abs(n) < 1000:
        return f"{n} byte{'' if n == 1 else 's'}"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if abs(value) < 999.5 or unit == "PB":
            return f"{value:.1f} {unit}" if abs(value) < 9.95 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


# -- decoding ---------------------------------------------------------------------------------


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    step = max(1, min(MAX_CHUNK_ROWS, math.ceil(n / (4 * workers))))
    return [(start, min(n, start + step)) for start in range(0, n, step)]


#: What decoding one chunk returns: (row position, reason) failures, (row position, pixel value)
#: of the images whose pixels are all equal, and (pid, start, end, CPU s).
ChunkResult = tuple[list[tuple[int, str]], list[tuple[int, int]], tuple[int, float, float, float]]


def _decode_all(
    source: Source,
    rows: pd.DataFrame,
    images_path: Path,
    shape: tuple[int, int, int],
    config: CacheConfig,
    workers: int,
    progress: bool,
) -> tuple[dict[int, str], dict[int, int], int, dict[str, float]]:
    """Decode every row into ``images_path``.

    Returns {row position: reason} for the failures, {row position: pixel value} for the images
    decoded with every pixel equal, the worker count used, and timings:
    ``startup_seconds`` (until the first image was being decoded: worker start-up),
    ``decode_seconds`` (the whole phase), ``steady_images_per_second`` (the sum over workers of
    each one's rows over its first-start-to-last-end time: the rate a long build converges to)
    and ``cpu_ms_per_image`` (CPU time the decoding itself took, per image).
    """
    chunks = _chunks(len(rows), workers)
    workers = min(workers, len(chunks))
    failures: dict[int, str] = {}
    flat: dict[int, int] = {}
    spans: list[tuple[int, int, float, float, float]] = []  # pid, rows, start, end, CPU s
    phase_start = time.time()  # wall clock: comparable across the worker processes
    decoded = (_decode_serial(source, rows, chunks, images_path, shape, config) if workers == 1
               else _decode_parallel(source, rows, chunks, images_path, shape, config, workers))
    try:
        with tqdm(total=len(rows), unit="img", desc=f"cache {source.name} {config.size}px",
                  disable=(not progress) or None, dynamic_ncols=True) as bar:
            for (chunk_failures, chunk_flat, (pid, start, end, cpu)), n_rows in decoded:
                spans.append((pid, n_rows, start, end, cpu))
                flat.update(chunk_flat)
                for position, reason in chunk_failures:
                    if config.strict:
                        raise DataError(
                            f"{reason} (image_id {rows['image_id'].iloc[position]!r}); strict=True stops at "
                            "the first unreadable image: without it the image is skipped and listed in "
                            f"{REPORT_FILE}"
                        )
                    failures[position] = reason
                bar.update(n_rows)
    finally:
        decoded.close()  # on any error: stop the workers now, before the partial folder is removed
    return failures, flat, workers, _timing(spans, phase_start, time.time())


def _decode_serial(
    source: Source, rows: pd.DataFrame, chunks: list[tuple[int, int]], images_path: Path,
    shape: tuple[int, int, int], config: CacheConfig,
) -> Iterator[tuple[ChunkResult, int]]:
    images = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=shape)
    for start, stop in chunks:
        yield _timed_decode(source, rows.iloc[start:stop], start, images, config), stop - start


def _decode_parallel(
    source: Source, rows: pd.DataFrame, chunks: list[tuple[int, int]], images_path: Path,
    shape: tuple[int, int, int], config: CacheConfig, workers: int,
) -> Iterator[tuple[ChunkResult, int]]:
    _check_picklable(source)
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(START_METHOD),
        initializer=_worker_init,
        initargs=(source, str(images_path), shape, config, os.getpid()),
    ) as pool:
        futures = {pool.submit(_worker_decode, rows.iloc[a:b], a): b - a for a, b in chunks}
        try:
            for future in as_completed(futures):
                yield future.result(), futures[future]
        except BaseException:  # an error, Ctrl-C, or the consumer closing us: drop queued chunks
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _timing(spans: list[tuple[int, int, float, float, float]], phase_start: float, phase_end: float) -> dict:
    steady = 0.0
    for pid in {span[0] for span in spans}:
        mine = [span for span in spans if span[0] == pid]
        busy = max(span[3] for span in mine) - min(span[2] for span in mine)
        steady += sum(span[1] for span in mine) / busy if busy > 0 else 0.0
    n_rows = sum(span[1] for span in spans)
    return {
        "startup_seconds": round(min(span[2] for span in spans) - phase_start, 3),
        "decode_seconds": round(phase_end - phase_start, 3),
        "steady_images_per_second": round(steady, 1),
        "cpu_ms_per_image": round(1000 * sum(span[4] for span in spans) / n_rows, 2),
    }


def _timed_decode(
    source: Source, rows: pd.DataFrame, first: int, images: np.ndarray, config: CacheConfig
) -> ChunkResult:
    start, cpu = time.time(), time.process_time()
    failures, flat = _decode_chunk(source, rows, first, images, config)
    return failures, flat, (os.getpid(), start, time.time(), time.process_time() - cpu)


def _decode_chunk(
    source: Source, rows: pd.DataFrame, first: int, images: np.ndarray, config: CacheConfig
) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    """Decode ``rows`` into ``images[first:first+len(rows)]``; return the (position, reason)
    failures and the (position, value) of images whose pixels are all equal."""
    results = source.read_images(rows, config.size, config.fit)
    if len(results) != len(rows):
        raise DataError(
            f"source {source.name!r}: read_images returned {len(results)} results for {len(rows)} rows; "
            "it must return one array or DataError per row"
        )
    failures = []
    flat = []
    expected = (config.size, config.size)
    for offset, result in enumerate(results):
        position = first + offset
        if isinstance(result, DataError):
            failures.append((position, str(result)))
            continue
        if not isinstance(result, np.ndarray) or result.shape != expected or result.dtype != np.uint8:
            got = (f"{result.dtype} array of shape {result.shape}" if isinstance(result, np.ndarray)
                   else type(result).__name__)
            raise DataError(
                f"source {source.name!r}: read_images gave a {got} for image {rows['image_id'].iloc[offset]!r}; "
                f"expected a uint8 array of shape {expected} or a DataError"
            )
        images[position] = result
        low = int(result.min())
        if low == int(result.max()):
            flat.append((position, low))
    return failures, flat


def _check_picklable(source: Source) -> None:
    try:
        pickle.dumps(source)
    except Exception as exc:
        raise DataError(
            f"source {source.name!r} cannot be sent to decoding processes ({type(exc).__name__}: {exc}); "
            "define it in an importable module with picklable attributes, or use workers=1"
        ) from exc


_WORKER: dict[str, Any] = {}


def _worker_init(source: Source, images_path: str, shape: tuple[int, int, int], config: CacheConfig,
                 builder_pid: int) -> None:
    # Each worker maps the output once and writes its rows in place: no pixels travel back.
    _WORKER["source"] = source
    _WORKER["config"] = config
    _WORKER["images"] = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=shape)
    _keep_large_temporaries_on_heap()
    threading.Thread(target=_exit_when_orphaned, args=(builder_pid,), daemon=True).start()


def _keep_large_temporaries_on_heap(mmap_threshold: int = 256 * 2**20, trim_threshold: int = 512 * 2**20) -> None:
    """Let glibc reuse freed heap for the image-sized temporaries of decoding.

    Decoding one 1024 x 1024 image allocates several 8 MB float64 arrays. A fresh process serves
    each with a new mmap, and the page faults on it cost about a third of the worker's CPU
    (measured: ~1,500 minor faults and 20 vs 15 CPU ms per image). Raising the thresholds keeps
    them on the heap; it cannot raise peak memory, only keep it until the worker exits.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc (macOS, Windows): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    mallopt(m_mmap_threshold, mmap_threshold)
    mallopt(m_trim_threshold, trim_threshold)


def _exit_when_orphaned(builder_pid: int, poll_seconds: float = 0.5) -> None:
    """Exit when the builder dies: a killed builder's pool workers would otherwise wait forever
    on their task queue (each holds a copy of the queue's write end, so it never reports EOF)."""
    while True:
        time.sleep(poll_seconds)
        if os.getppid() != builder_pid:
            os._exit(1)


def _worker_decode(rows: pd.DataFrame, first: int) -> ChunkResult:
    # No msync per chunk: the shared mapping makes the pixels visible to every process at once,
    # and the builder fsyncs the file once before publishing the cache.
    return _timed_decode(_WORKER["source"], rows, first, _WORKER["images"], _WORKER["config"])


def _compact(images_path: Path, shape: tuple[int, int, int], kept: np.ndarray) -> None:
    """Move the kept rows down over the skipped ones so cache rows run 0..N-1, then truncate."""
    images = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=shape)
    block = 256  # rows per copy: bounded memory for numpy's overlap-safe temporary
    new = 0
    # runs of consecutive kept rows move as slices
    breaks = np.flatnonzero(np.diff(kept) != 1) + 1
    for run in np.split(kept, breaks):
        old = int(run[0])
        for offset in range(0, len(run), block):
            count = min(block, len(run) - offset)
            if new + offset != old + offset:
                images[new + offset : new + offset + count] = images[old + offset : old + offset + count]
        new += len(run)
    images.flush()
    del images
    os.truncate(images_path, new * shape[1] * shape[2])


# -- publishing ------------------------------------------------------------------------------


def _publish(partial: Path, final: Path, replace: bool) -> bool:
    """Rename ``partial`` to ``final``; False when another build got there first."""
    stale = None
    if replace and final.exists():
        stale = final.with_name(f"{final.name}{_STALE}{uuid.uuid4().hex[:12]}")
        try:
            os.rename(final, stale)
        except FileNotFoundError:
            stale = None
    try:
        os.rename(partial, final)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        if not (final / REPORT_FILE).is_file():
            raise DataError(
                f"{final} exists but is not a complete cache (no {REPORT_FILE}); remove it and build again"
            ) from exc
        shutil.rmtree(partial, ignore_errors=True)
        return False
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    _fsync_dir(final.parent)
    return True


def _hold_lock(lock_path: Path) -> int:
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh random name: never contended
    return fd


def _release_lock(fd: int, lock_path: Path) -> None:
    lock_path.unlink(missing_ok=True)
    os.close(fd)


def _owner_alive(lock_path: Path, folder: Path) -> bool:
    """Whether the build that owns ``folder`` still runs (it holds the flock on ``lock_path``)."""
    if fcntl is None:
        try:
            return time.time() - folder.stat().st_mtime < _ABANDONED_AFTER_S
        except FileNotFoundError:
            return False
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False  # the lock is taken before the folder is made and dropped after it is gone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_abandoned(folder: Path) -> list[Path]:
    """Delete partial folders of dead builds and stale folders of replaced caches in ``folder``."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if _STALE in name and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif _PARTIAL in name and entry.is_dir():
            lock = entry.with_name(name + _LOCK_SUFFIX)
            if not _owner_alive(lock, entry):
                shutil.rmtree(entry, ignore_errors=True)
                lock.unlink(missing_ok=True)
                removed.append(entry)
        elif _PARTIAL in name and name.endswith(_LOCK_SUFFIX):
            folder_of_lock = entry.with_name(name[: -len(_LOCK_SUFFIX)])
            if not folder_of_lock.exists() and not _owner_alive(entry, entry):
                entry.unlink(missing_ok=True)
    if removed:
        log.info("removed %d abandoned cache build folder(s) in %s", len(removed), folder)
    return removed


def _write_json_durably(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


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
        if _PARTIAL in folder.name or _STALE in folder.name:
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
    "ImageCache",
    "build_cache",
    "cache_key",
    "cache_root",
    "cache_summary",
    "find_caches",
    "format_bytes",
    "get_cache",
    "remove_abandoned",
]
