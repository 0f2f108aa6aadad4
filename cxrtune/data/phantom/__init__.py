"""The phantom: synthetic chest radiographs rendered from a real chest CT.

Modules: :mod:`.ct` (fetch and load the CT), :mod:`.segment` (HU segmentation and per-structure
projections), :mod:`.anatomy` (the cached anatomy pool), :mod:`.render` (per-patient variation and
per-study imaging), :mod:`.findings` (ten findings with severities, masks and boxes),
:mod:`.builder` (dataset layout and :class:`PhantomConfig`), :mod:`.preview` (contact sheet).
"""

from cxrtune.data.phantom.builder import PhantomConfig
from cxrtune.data.phantom.findings import FINDINGS, NORMAL

__all__ = ["FINDINGS", "NORMAL", "PhantomConfig"]
