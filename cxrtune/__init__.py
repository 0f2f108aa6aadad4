"""cxrtune: tune self-supervised chest X-ray pretraining and judge it by few-shot evaluation.

The core package (everything under ``cxrtune`` except ``cxrtune.sweep``) never imports Ray, so
every piece runs and is debugged in a plain Python process.
"""

__version__ = "0.1.0"
