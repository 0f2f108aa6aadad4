"""A trial's own output in its folder: ``<trial>/trial.log``.

The sweep driver does not forward the workers' output to its console (Ray would print it in late
batches, after the summary), so each trial keeps what it prints - warnings, progress, a traceback
printed by a library - beside its results, where the console's error line points.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path
from typing import Iterator

from ray import tune

from cxrtune.sweepfolder import TRIAL_LOG


class _Tee:
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def trial_folder() -> Path:
    """Where this trial keeps its own files: its folder in the sweep's storage when that is a
    local or mounted file system, else Tune's trial folder.

    ``get_trial_dir()`` is a staging folder under Ray's session folder (``/tmp/ray/session_*``)
    that the driver copies into the sweep folder from time to time: files written there exist
    twice, stay behind in ``/tmp/ray`` after the sweep, and a resumed sweep (a new Ray session)
    starts from an empty one. Writing straight into the sweep folder avoids all three.
    """
    try:
        import pyarrow.fs

        storage = tune.get_context().get_storage()
        if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            return Path(storage.trial_fs_path)
    except Exception:  # an API Ray marks as developer-only: fall back to the public one
        pass
    return Path(tune.get_context().get_trial_dir())


@contextlib.contextmanager
def trial_log() -> Iterator[Path]:
    """Copy this trial's ``sys.stdout`` and ``sys.stderr`` into ``<trial>/trial.log`` (appended,
    so a resumed trial adds to it); the worker's own streams still receive everything."""
    path = trial_folder() / TRIAL_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as log:
        with contextlib.redirect_stdout(_Tee(sys.stdout, log)), contextlib.redirect_stderr(_Tee(sys.stderr, log)):
            try:
                yield path
            except Exception:
                traceback.print_exc(file=log)
                raise
