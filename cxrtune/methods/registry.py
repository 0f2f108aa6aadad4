"""The registry of pretraining methods: a method module registers its class, its config dataclass
and its presets together, and everything that lists methods asks here.

A method file declares itself once::

    @register_method("vicreg", config=VicregConfig, presets={
        "study": {"model.arch": "resnet50", "optim.lr": 0.3, ...},   # its recipe at 224 px
        "cpu": {"vicreg.expander_dims": [512, 512, 512], ...},        # 64 px on 2 cores
        "smoke": {"vicreg.expander_dims": [64, 64], ...},             # seconds, for tests
    })
    class Vicreg(SSLMethod): ...

Every module of :mod:`cxrtune.methods` is imported on first use of the registry, so a new method
file is found without editing any list. Presets are dotted config keys: the method's own
(``vicreg.*``) and the engine's (``model.*``, ``optim.*``, ``train.*``, ``augment.*``). The
``study`` preset is the method's full recipe and the base of the others; how the profiles combine
them with what every method shares at a scale is :mod:`cxrtune.profiles`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from cxrtune.config import Config
from cxrtune.errors import ConfigError

#: the presets every method declares
PRESETS = ("study", "cpu", "smoke")
#: modules of cxrtune.methods that hold no method
_NOT_METHODS = {"base", "heads", "registry"}


@dataclass(frozen=True)
class MethodEntry:
    name: str
    cls: type
    config: type[Config]
    presets: Mapping[str, Mapping[str, Any]]
    summary: str

    def preset(self, name: str) -> dict[str, Any]:
        if name not in self.presets:
            raise ConfigError(f"method {self.name} has no preset {name!r}: it has {', '.join(self.presets)}")
        return dict(self.presets[name])


_REGISTRY: dict[str, MethodEntry] = {}
_discovered = False


def register_method(name: str, *, config: type[Config], presets: Mapping[str, Mapping[str, Any]]) -> Callable[[type], type]:
    """Class decorator: register an :class:`~cxrtune.methods.base.SSLMethod` under ``name``."""
    missing = [p for p in PRESETS if p not in presets]
    if missing:
        raise ConfigError(f"method {name!r} declares no {missing[0]!r} preset: every method declares {', '.join(PRESETS)}")
    foreign = sorted({k for preset in presets.values() for k in preset
                      if "." in k and k.split(".", 1)[0] not in (name, "model", "optim", "train", "augment")})
    if foreign:
        raise ConfigError(f"method {name!r}: preset key {foreign[0]!r} is neither its own ({name}.*) nor an engine key "
                          "(model.*, optim.*, train.*, augment.*)")

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ConfigError(f"method name {name!r} is registered twice: by {_REGISTRY[name].cls.__module__} and "
                              f"{cls.__module__}")
        cls.name = name
        summary = (cls.__module__ and (importlib.import_module(cls.__module__).__doc__ or "")).strip()
        _REGISTRY[name] = MethodEntry(name, cls, config, {k: dict(v) for k, v in presets.items()},
                                      summary.splitlines()[0] if summary else name)
        return cls

    return decorate


def _discover() -> None:
    """Import every module of cxrtune.methods once, so each registers itself."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import cxrtune.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order (the study's four first)."""
    _discover()
    order = ("moco", "barlow", "spark", "dino")
    return tuple(sorted(_REGISTRY, key=lambda n: (order.index(n) if n in order else len(order), n)))


def get_method(name: str) -> MethodEntry:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"method = {name!r} is not known: use one of {', '.join(method_names())}")
    return _REGISTRY[name]


def build_method(name: str, backbone, config: Config):
    """The method ``name`` around ``backbone``, configured by its own config block."""
    entry = get_method(name)
    if not isinstance(config, entry.config):
        raise ConfigError(f"method {name} takes a {entry.config.__name__}, not a {type(config).__name__}")
    return entry.cls(backbone, config)
