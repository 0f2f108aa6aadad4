"""Self-supervised pretraining methods, one file each, found by name through the registry.

``method_names()`` lists them (moco, barlow, spark, dino and every other module here that
registers itself with ``@register_method``); ``build_method(name, backbone, config)`` makes one.
"""

from __future__ import annotations

from cxrtune.methods.base import Progress, SSLMethod
from cxrtune.methods.registry import MethodEntry, build_method, get_method, method_names, register_method

__all__ = ["MethodEntry", "Progress", "SSLMethod", "build_method", "get_method", "method_names", "register_method"]
