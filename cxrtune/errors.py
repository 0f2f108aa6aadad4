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
