"""A sweep's console: our own lines on the terminal, Ray's chatter in ``<sweep>/ray-console.log``.

Ray prints from many places during a sweep: Tune's configuration box and progress tables, the
``ray.init`` banner and warnings, Optuna's and MLflow's start-up logs, and the trials' own output
forwarded from the workers. ``RunConfig(verbose=0)`` silences only part of it (the configuration
box, the results-folder hints and the forwarded worker lines still print), so
:class:`RayConsole` redirects the process's file descriptors 1 and 2 into a log file while Tune
runs, and hands out a stream on the original terminal for the lines a user reads:
:class:`ConsoleCallback` writes one line per finished epoch and one per finished trial there, and
a failed trial's error with the path of its traceback, so a failure is never hidden in the log.

With ``--verbose`` nothing is redirected and Ray prints as it normally does.
"""

from __future__ import annotations

import io
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from cxrtune.sweepfolder import TRIAL_LOG

_streams: list[tuple[TextIO, TextIO]] = []


def console_out() -> TextIO:
    """Where a sweep's own progress lines go: the terminal while Ray's output is redirected."""
    return _streams[-1][0] if _streams else sys.stdout


def console_err() -> TextIO:
    return _streams[-1][1] if _streams else sys.stderr


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


class RayConsole:
    """Context manager: fds 1 and 2 into ``log_path`` (appended); ``None`` leaves them alone.

    Streams of our own are opened on duplicates of the original descriptors, so progress lines
    reach the terminal (or the pipe a caller reads) while everything else written to fd 1/2 -
    Python prints, logging handlers, native Ray code - lands in the log.
    """

    def __init__(self, log_path: str | os.PathLike | None) -> None:
        self.log_path = Path(log_path) if log_path is not None else None
        self._saved: list[tuple[int, int]] = []
        self._opened: list[TextIO] = []

    def _our_stream(self, stream: TextIO, fd: int) -> TextIO:
        # A stream that writes to the descriptor being redirected needs a duplicate of it; any
        # other stream (a test's capture buffer) is used as it is.
        if _fileno(stream) != fd:
            return stream
        out = os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                        errors="replace")
        self._opened.append(out)
        return out

    def __enter__(self) -> "RayConsole":
        if self.log_path is None:
            _streams.append((sys.stdout, sys.stderr))
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        streams = (self._our_stream(sys.stdout, 1), self._our_stream(sys.stderr, 2))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for fd in (1, 2):
                self._saved.append((fd, os.dup(fd)))
                os.dup2(log_fd, fd)
        finally:
            os.close(log_fd)
        _streams.append(streams)
        return self

    def __exit__(self, *exc: Any) -> None:
        _streams.pop()
        if self.log_path is None:
            return
        # Ray's prints sit in Python's buffers until flushed: flush them into the log, not the terminal.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, saved in self._saved:
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()
        for stream in self._opened:
            stream.close()
        self._opened.clear()


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class ConsoleCallback(Callback):
    """One line per finished epoch and per finished trial; a failed trial's error and log path.

    ``keys`` are the result entries shown on each epoch line (those a trial reports).
    """

    def __init__(self, keys: tuple[str, ...] = ("ssl_loss", "feature_std"), objective: str | None = None,
                 log_path: str | None = None) -> None:
        self.keys = tuple(keys)
        self.objective = objective
        self.log_path = log_path

    def _line(self, text: str, error: bool = False) -> None:
        stream = console_err() if error else console_out()
        print(text, file=stream, flush=True)

    def on_trial_result(self, iteration: int, trials, trial, result: dict[str, Any], **info) -> None:
        epoch = result.get("epoch", result.get("training_iteration"))
        shown = [f"{k} {_short(result[k])}" for k in (*self.keys, self.objective) if k and k in result]
        self._line(f"trial {trial.trial_id} epoch {epoch}: " + ", ".join(shown))

    def on_trial_complete(self, iteration: int, trials, trial, **info) -> None:
        from cxrtune.health import trial_status

        result = trial.last_result or {}
        status = trial_status(result, False)
        objective = (f", {self.objective} {_short(result[self.objective])}"
                     if self.objective and self.objective in result else "")
        epoch = result.get("epoch", result.get("training_iteration", "?"))
        self._line(f"trial {trial.trial_id} {status} after epoch {epoch}{objective}")

    def on_trial_recover(self, iteration: int, trials, trial, **info) -> None:
        # A failure Tune retries (FailureConfig.max_failures): a lost node, a killed worker.
        result = trial.last_result or {}
        epoch = result.get("epoch", result.get("training_iteration"))
        where = f"from its checkpoint after epoch {epoch}" if epoch else "from the start"
        self._line(f"trial {trial.trial_id} failed (attempt {trial.num_failures}); retrying {where}", error=True)

    def on_trial_error(self, iteration: int, trials, trial, **info) -> None:
        # Tune writes the traceback in the driver's staging copy of the trial folder (under Ray's
        # session folder) and syncs it to the sweep folder: show the sweep folder's path, which
        # stays, and read the text from whichever copy exists now.
        staged = Path(trial.error_file) if trial.error_file else None
        folder = Path(trial.path) if trial.path else (staged.parent if staged else None)
        name = staged.name if staged else "error.txt"
        detail = ""
        for candidate in (staged, folder / name if folder else None):
            if candidate is not None and candidate.is_file():
                lines = [l for l in candidate.read_text(errors="replace").splitlines() if l.strip()]
                detail = lines[-1].strip() if lines else ""
                break
        where = [f"traceback: {folder / name if folder else 'see the trial folder'}"]
        if folder is not None and any(d is not None and (d / TRIAL_LOG).is_file()
                                      for d in (folder, staged.parent if staged else None)):
            where.append(f"trial log: {folder / TRIAL_LOG}")
        if self.log_path:
            where.append(f"Ray's output: {self.log_path}")
        self._line(f"trial {trial.trial_id} errored: {detail or 'see its traceback'}; " + "; ".join(where), error=True)
