"""Run a sweep script from a checkout of cxrtune, installed or not: when ``cxrtune`` is not
importable, the checkout's root goes on the path. A sweep script of your own, with cxrtune
installed, does not need this module."""

import sys
from pathlib import Path

try:
    import cxrtune  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
