"""Decoding a cache's images, in this process or in a pool of 'spawn' worker processes.

Each worker maps the partial images file once and writes its rows in place, so no pixels travel
between processes; only failures, flat images and timings come back. The worker functions live
here, in an importable module, because 'spawn' workers import them by module path.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrtune.data.cache_disk import REPORT_FILE
from cxrtune.errors import DataError

if TYPE_CHECKING:
    from cxrtune.data.cache import CacheConfig
    from cxrtune.data.sources.base import Source

#: 'spawn' is safe whatever the parent holds (threads, CUDA, a tqdm monitor) and works the same
#: on every platform; its start-up cost (~1 s per worker) is small next to decoding an archive.
START_METHOD = "spawn"
#: Rows per decoding task: small enough for an even load and a live progress bar, large enough
#: that the per-task cost (pickling the rows, one round trip) stays negligible.
MAX_CHUNK_ROWS = 64


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    step = max(1, min(MAX_CHUNK_ROWS, math.ceil(n / (4 * workers))))
    return [(start, min(n, start + step)) for start in range(0, n, step)]


#: What decoding one chunk returns: (row position, reason) failures, (row position, pixel value)
#: of the images whose pixels are all equal, and (pid, start, end, CPU s).
ChunkResult = tuple[list[tuple[int, str]], list[tuple[int, int]], tuple[int, float, float, float]]


def decode_all(
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
