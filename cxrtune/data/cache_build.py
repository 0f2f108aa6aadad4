"""Building one cache: decode a source's rows into a partial folder, write its report, publish it.

Missing files are found before anything is decoded and free space is checked before the images
file is sized, so a build that cannot finish fails in seconds. Unreadable images are compacted
out of the images file; what was skipped and which cached images look wrong (every pixel equal)
go into ``cache.json`` with the build's timings.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxrtune.data.cache_decode import decode_all
from cxrtune.data.cache_disk import (
    FORMAT_VERSION,
    IMAGES_FILE,
    INDEX_FILE,
    REPORT_FILE,
    fsync_file,
    partial_folder,
    publish,
    write_json_durably,
)
from cxrtune.data.index import write_index
from cxrtune.data.sources.base import Source
from cxrtune.data.sources.files import link_loop
from cxrtune.errors import DataError

if TYPE_CHECKING:
    from cxrtune.data.cache import CacheConfig


def build_new(
    source: Source,
    index: pd.DataFrame,
    fingerprint: str,
    final: Path,
    config: CacheConfig,
    progress: bool,
    replace: bool,
) -> tuple[bool, list[dict[str, str]]]:
    """Build the cache of ``index`` and publish it as ``final`` (replacing one there if ``replace``).

    Returns whether this build published it (False: another build of the same key finished first
    and this copy was discarded) and the ``flagged`` entries of its report.
    """
    started = time.perf_counter()
    size = config.size
    index = index.drop(columns=["cache_row"], errors="ignore").reset_index(drop=True)
    todo, skipped = _drop_missing(source, index, config.allow_missing)
    _check_free_space(final.parent, len(todo) * size * size)
    with partial_folder(final) as partial:
        images_path = partial / IMAGES_FILE
        shape = (len(todo), size, size)
        with open(images_path, "wb") as f:
            f.truncate(len(todo) * size * size)
        failures, flat, workers, timing = decode_all(
            source, todo, images_path, shape, config, config.resolved_workers(len(todo)), progress)
        skipped += [_skip_entry(todo.iloc[p], reason) for p, reason in sorted(failures.items())]
        flagged = [_flag_entry(source, todo.iloc[p], value) for p, value in sorted(flat.items())]
        cached = _cached_rows(source, todo, failures, images_path, shape, skipped, len(index))
        meta = {"source": source.describe(), "fingerprint": fingerprint, "size": size, "fit": config.fit}
        write_index(cached, partial / INDEX_FILE, metadata=meta)
        source.write_extras(partial, cached, size, config.fit)
        fsync_file(images_path)
        timing["build_seconds"] = round(time.perf_counter() - started, 3)
        report = _build_report(meta, len(index), len(cached), skipped, workers, timing, flagged)
        write_json_durably(partial / REPORT_FILE, report)
        return publish(partial, final, replace), flagged


def _cached_rows(source: Source, todo: pd.DataFrame, failures: dict[int, str], images_path: Path,
                 shape: tuple[int, int, int], skipped: list[dict[str, str]], n_listed: int) -> pd.DataFrame:
    """The rows that decoded, numbered 0..N-1 in ``cache_row`` once the images file is compacted."""
    kept = np.array([p for p in range(len(todo)) if p not in failures], dtype=np.int64)
    if len(kept) == 0:
        examples = "; ".join(s["reason"] for s in skipped[:3])
        raise DataError(
            f"source {source.name!r}: none of the {n_listed:,} indexed images could be read "
            f"(e.g. {examples}); no cache was written"
        )
    if len(kept) < len(todo):
        compact(images_path, shape, kept)
    cached = todo.iloc[kept].reset_index(drop=True)
    cached["cache_row"] = np.arange(len(cached), dtype=np.int64)
    return cached


def compact(images_path: Path, shape: tuple[int, int, int], kept: np.ndarray) -> None:
    """Move the kept rows down over the skipped ones so cache rows run 0..N-1, then truncate."""
    images = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=shape)
    block = 256  # rows per copy: bounded memory for numpy's overlap-safe temporary
    new = 0
    # runs of consecutive kept rows move as slices
    breaks = np.flatnonzero(np.diff(kept) != 1) + 1
    for run in np.split(kept, breaks):
        old = int(run[0])
        if new != old:
            for offset in range(0, len(run), block):
                count = min(block, len(run) - offset)
                images[new + offset : new + offset + count] = images[old + offset : old + offset + count]
        new += len(run)
    images.flush()
    del images
    os.truncate(images_path, new * shape[1] * shape[2])


# -- the report ---------------------------------------------------------------------------------


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
                  workers: int, timing: dict[str, float], flagged: list[dict[str, str]]) -> dict[str, Any]:
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
            "flagged": len(flagged),
        },
        "skipped": skipped,
        "flagged": flagged,
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


# -- checks before decoding ---------------------------------------------------------------------


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
