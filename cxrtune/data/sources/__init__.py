"""Data sources: ``nih``, ``padchest``, ``csv`` and the embedded ``phantom``."""

from cxrtune.data.sources.base import Source, make_source, register_source, source_names

__all__ = ["Source", "make_source", "register_source", "source_names"]
