"""Ray Tune adapters: turn a trial's config into a core call, report, checkpoint, honour resources.

No science lives here: see :mod:`cxrtune.trial`.
"""
