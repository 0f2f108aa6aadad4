"""Tell a Ctrl-C from a finished sweep.

On the first SIGINT, Tune stops its loop, saves the experiment state (the running trials as
RUNNING, so ``Tuner.restore`` continues them from their checkpoints) and returns from ``fit()``
as if the sweep were done: the running trials come back TERMINATED, indistinguishable from
trials ASHA stopped, and no callback hears of their end. :class:`InterruptWatch` wraps Tune's
SIGINT handler when the run starts (callbacks are set up after Tune installs it) and records the
signal, so the driver can mark those trials ``interrupted``, leave their Optuna trials to the
resume, and tell the user how to continue.
"""

from __future__ import annotations

import signal
import threading

from ray.tune import Callback

_interrupted = threading.Event()
_cut: set[str] = set()


def interrupted() -> bool:
    """Whether a SIGINT reached the sweep that is running (or just ran) in this process."""
    return _interrupted.is_set()


def cut_trials() -> set[str]:
    """Ids of the trials the last run cut off while they ran (closed ``interrupted`` in MLflow)."""
    return set(_cut)


def record_cut(trial_ids) -> None:
    _cut.update(trial_ids)


def reset() -> None:
    _interrupted.clear()
    _cut.clear()


def fit_restoring_sigint(tuner):
    """``tuner.fit()``, then the SIGINT handler the driver had before: Tune leaves its own
    installed when the sweep ends without a signal, which would swallow a Ctrl-C during the
    summary and export that follow."""
    before = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        return tuner.fit()
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


class InterruptWatch(Callback):
    def setup(self, **info) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        tune_handler = signal.getsignal(signal.SIGINT)

        def on_sigint(sig, frame):
            _interrupted.set()
            if callable(tune_handler):
                tune_handler(sig, frame)  # Tune's: stop the loop, then restore the default handler
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
