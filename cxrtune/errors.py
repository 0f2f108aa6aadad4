"""Exceptions that callers can tell apart.

Every message names the input, the offending value and what would be valid.
"""


class CxrtuneError(Exception):
    """Base class for errors cxrtune raises on purpose."""


class ConfigError(CxrtuneError, ValueError):
    """A configuration field holds a value outside its allowed range."""


class DataError(CxrtuneError):
    """A data source, index, image or cache is missing, malformed or inconsistent."""


class TaskError(CxrtuneError):
    """A few-shot task cannot be built as requested (too few positives, overlapping patients)."""


class DivergenceError(CxrtuneError, FloatingPointError):
    """The training loss became NaN or infinite: the run diverged (not a crash of the code).

    Sweep code marks such a trial ``diverged`` rather than ``errored``; ``epoch``, ``step`` and
    ``loss`` say where it happened.
    """

    def __init__(self, message: str, *, epoch: int | None = None, step: int | None = None,
                 loss: float | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.loss = loss
