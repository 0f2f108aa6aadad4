"""On-disk layout and atomicity of image caches: file names, partial folders, publishing, cleanup.

A cache is built in a sibling folder ``<key>.partial-<random>`` and renamed into place only when
complete, so a cache is complete exactly when its final folder exists (and holds ``cache.json``).
Each partial folder has a ``<folder>.lock`` file that its build holds with :mod:`filelock` from
before the folder is made until after it is gone; a later build removes the partial folders whose
lock no live process holds. Kept apart from the build so that the rules of what may be deleted
when sit in one place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from cxrtune.errors import DataError

# One logger for every part of the cache, named as before the cache was split into modules.
log = logging.getLogger("cxrtune.data.cache")

FORMAT_VERSION = 1
IMAGES_FILE = "images.u8"
INDEX_FILE = "index.parquet"
REPORT_FILE = "cache.json"
PARTIAL = ".partial-"
STALE = ".stale-"
_LOCK_SUFFIX = ".lock"
#: A partial folder without a lock file is taken as abandoned once this old (see _abandoned).
_ABANDONED_AFTER_S = 24 * 3600
#: How long a build waits for its own, freshly named lock: only a cleanup's probe can hold it,
#: and only for an instant.
_TAKE_LOCK_S = 10.0


def cache_key(fingerprint: str, size: int, fit: str) -> str:
    return f"{fingerprint}-s{size}-{fit}"


# -- locks ------------------------------------------------------------------------------------


def lock_path(partial: Path) -> Path:
    return partial.with_name(partial.name + _LOCK_SUFFIX)


def hold_lock(path: Path) -> FileLock:
    """Take the lock a build holds while its partial folder exists."""
    lock = FileLock(path, timeout=_TAKE_LOCK_S, is_singleton=False)
    lock.acquire()
    return lock


def release_lock(lock: FileLock) -> None:
    # Released before the unlink: Windows cannot delete a file that is open.
    lock.release()
    Path(lock.lock_file).unlink(missing_ok=True)


def lock_held(path: Path) -> bool:
    """Whether a live process holds the lock at ``path``: a non-blocking acquire attempt times out.

    The operating system drops a lock when its holder dies, however it dies, so a killed build
    never looks alive. A missing lock file is held by nobody (and is not created).
    """
    if not path.exists():
        return False
    probe = FileLock(path, timeout=0, is_singleton=False)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


# -- building in a partial folder ------------------------------------------------------------------


@contextlib.contextmanager
def partial_folder(final: Path) -> Iterator[Path]:
    """A new partial folder beside ``final``, locked while it exists and removed if the block raises.

    The block must end by publishing the folder (:func:`publish`) or by raising.
    """
    partial = final.with_name(f"{final.name}{PARTIAL}{uuid.uuid4().hex[:12]}")
    lock = hold_lock(lock_path(partial))
    try:
        partial.mkdir()
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        release_lock(lock)


def publish(partial: Path, final: Path, replace: bool) -> bool:
    """Rename ``partial`` to ``final``; False when another build got there first."""
    stale = None
    if replace and final.exists():
        stale = final.with_name(f"{final.name}{STALE}{uuid.uuid4().hex[:12]}")
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


# -- cleanup ------------------------------------------------------------------------------------


def remove_abandoned(folder: Path) -> list[Path]:
    """Delete partial folders of dead builds and stale folders of replaced caches in ``folder``."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if STALE in name and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif PARTIAL in name and entry.is_dir():
            if _abandoned(entry):
                shutil.rmtree(entry, ignore_errors=True)
                lock_path(entry).unlink(missing_ok=True)
                removed.append(entry)
        elif PARTIAL in name and name.endswith(_LOCK_SUFFIX):
            # a lock without its folder: a build about to make it, or one that died before or after
            if not entry.with_name(name[: -len(_LOCK_SUFFIX)]).exists() and not lock_held(entry):
                entry.unlink(missing_ok=True)
    if removed:
        log.info("removed %d abandoned cache build folder(s) in %s", len(removed), folder)
    return removed


def _abandoned(partial: Path) -> bool:
    lock = lock_path(partial)
    if lock.exists():
        return not lock_held(lock)
    # A build takes its lock before making the folder and deletes it after the folder is gone, so a
    # lockless folder lost its lock file some other way (deleted by hand, or by a cleanup that
    # raced the build for it): only its age tells a dead build from a live one then.
    try:
        return time.time() - partial.stat().st_mtime > _ABANDONED_AFTER_S
    except FileNotFoundError:
        return False


# -- durable writes -----------------------------------------------------------------------------


def write_json_durably(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
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
