"""cxrtune: tune self-supervised chest X-ray pretraining and judge it by few-shot evaluation.

The core package (everything under ``cxrtune`` except ``cxrtune.sweep`` and ``cxrtune.trainables``)
never imports Ray, so every piece runs and is debugged in a plain Python process.

``cxrtune.analysis`` and ``cxrtune.trainables`` live in the repository's ``analysis/`` and
``trainables/`` folders; an install maps them there (pyproject.toml), and from a checkout that is
not installed the finder below does.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

#: installed name -> the repository folder that holds it
_FOLDERS = {"cxrtune.analysis": "analysis", "cxrtune.trainables": "trainables"}
_CHECKOUT = Path(__file__).resolve().parent.parent


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``cxrtune.analysis`` and ``cxrtune.trainables`` in a checkout's top-level folders."""

    def find_spec(self, fullname, path=None, target=None):
        folder = _FOLDERS.get(fullname)
        if folder is None:
            return None
        init = _CHECKOUT / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


if (_CHECKOUT / "pyproject.toml").is_file() and not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutFinder())  # after the path finders: an installed copy wins
