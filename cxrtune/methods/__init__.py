"""The four pretraining methods of the study, by name: moco, barlow, spark, dino."""

from __future__ import annotations

from cxrtune.errors import ConfigError
from cxrtune.methods.barlow import Barlow, BarlowConfig
from cxrtune.methods.base import Progress, SSLMethod
from cxrtune.methods.dino import Dino, DinoConfig
from cxrtune.methods.moco import Moco, MocoConfig
from cxrtune.methods.spark import Spark, SparkConfig

METHODS: dict[str, type[SSLMethod]] = {"moco": Moco, "barlow": Barlow, "spark": Spark, "dino": Dino}


def build_method(name: str, backbone, config) -> SSLMethod:
    if name not in METHODS:
        raise ConfigError(f"method = {name!r} is not known: use one of {', '.join(METHODS)}")
    return METHODS[name](backbone, config)


__all__ = ["METHODS", "build_method", "Progress", "SSLMethod", "Moco", "MocoConfig", "Barlow", "BarlowConfig",
           "Spark", "SparkConfig", "Dino", "DinoConfig"]
