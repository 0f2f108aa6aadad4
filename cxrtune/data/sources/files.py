"""File-system helpers shared by the file-based sources: find the label CSV, read it with a
header check, and map image file names to paths with one directory scan per folder.

A scan (``os.scandir``) lists 112,120 NIH file names in well under a second, where one
``os.path.isfile`` per CSV row would cost a system call each; sources therefore look names up
in the dictionary a scan returns instead of probing the disk row by row.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from cxrtune.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def locate_csv(root: Path, explicit: str | None, candidates: Sequence[str], what: str) -> Path:
    """The label CSV: ``explicit`` (absolute, or relative to ``root``) or the first of
    ``candidates`` (file names, each also tried with ``.gz``) found in ``root``."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_absolute():
            path = root / path
        if not path.is_file():
            raise DataError(f"{what}: csv = {str(explicit)!r} does not exist (looked for {path})")
        return path
    for name in candidates:
        for candidate in (root / name, root / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise DataError(
        f"{what}: no label CSV in {root}; expected one of {', '.join(candidates)} (or .gz), "
        "or pass csv=PATH"
    )


def read_header(path: Path, what: str = "csv") -> list[str]:
    """The column names pandas will see, without reading the rows."""
    try:
        return [str(c) for c in pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns]
    except Exception as exc:  # empty file, bad compression, binary junk
        raise DataError(f"{what}: {path} could not be read as CSV ({type(exc).__name__}: {exc})") from exc


def read_table(path: Path, what: str, **options) -> pd.DataFrame:
    """``pandas.read_csv`` (BOM-tolerant) with parse failures reported as :class:`DataError`."""
    try:
        return pd.read_csv(path, encoding="utf-8-sig", **options)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{what}: {path} could not be read as CSV ({type(exc).__name__}: {exc})") from exc


def check_header(path: Path, required: Sequence[str], what: str) -> list[str]:
    """Raise naming the missing fields, the expected and the found header; return the header."""
    header = read_header(path, what)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{what}: {path.name} lacks the column(s) {missing}; expected a header with "
            f"{list(required)} but found {header}"
        )
    return header


def scan_folders(folders: Iterable[Path], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, str]:
    """Map each image file name to its path over ``folders`` (first folder wins on a clash)."""
    found: dict[str, str] = {}
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = entry.name
                    if name.lower().endswith(suffixes) and name not in found and _is_file(entry):
                        found[name] = entry.path
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            continue  # a folder that is a symbolic link loop holds nothing
    return found


def _is_file(entry: os.DirEntry) -> bool:
    """``entry.is_file()``, except that a symbolic link that cannot be followed because it loops
    (``a -> b -> a``) counts as a file: it is indexed, and the cache builder then skips it and
    lists it with the other unreadable images instead of the whole scan failing."""
    try:
        return entry.is_file()
    except OSError as exc:
        return exc.errno == errno.ELOOP


def link_loop(path: str | os.PathLike) -> bool:
    """Whether ``path`` cannot be reached because of a symbolic link loop (on it or on a folder
    it goes through)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def subfolders(root: Path, pattern: str) -> list[Path]:
    """Sorted sub-folders of ``root`` matching a glob ``pattern``."""
    return sorted(p for p in root.glob(pattern) if p.is_dir())


def plain_options(options: dict) -> dict:
    """Options as JSON-able values (paths become strings) so they validate and log cleanly."""
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in options.items()}


def read_list_file(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text file (the NIH split lists)."""
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def existing_files(paths: Iterable[str]) -> list[bool]:
    """Whether each path is an existing file, with one directory scan per parent folder.

    A path that a symbolic link loop makes unreachable counts as existing (see :func:`_is_file`)."""
    paths = list(paths)
    parents: dict[str, set[str]] = {}
    looping: set[str] = set()  # folders that are symbolic link loops
    for p in {os.path.dirname(p) for p in paths}:
        names: set[str] = set()
        try:
            with os.scandir(p or ".") as entries:
                names = {e.name for e in entries if _is_file(e)}
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            pass
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            looping.add(p)
        parents[p] = names
    # A path through a looping folder "exists" like a looping link does: the cache lists it as
    # unreadable, with the reason, instead of the index calling it missing.
    return [os.path.basename(p) in parents[d] or (d in looping and link_loop(p))
            for p, d in ((p, os.path.dirname(p)) for p in paths)]
