"""The configuration of one pretraining run: one dataclass per concern, flattening to dotted keys.

``PretrainConfig(method="moco").to_flat()`` gives keys such as ``method``, ``moco.variance_weight``,
``optim.lr``, ``train.epochs``, ``augment.crop_scale_min``: what a sweep overrides and what MLflow
logs. A config holds the chosen method's block only (a MoCo run has ``moco.*`` keys, no
``dino.*``); the block's class comes from the method registry (:mod:`cxrtune.methods.registry`).
Named starting points (the study's recipe, the cpu and smoke scales) are :mod:`cxrtune.profiles`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from cxrtune.augment import AugmentConfig
from cxrtune.config import Config, param, unflatten
from cxrtune.errors import ConfigError
from cxrtune.methods.registry import get_method, method_names


@dataclass
class ModelConfig(Config):
    arch: str = param("resnet50", choices=("resnet18", "resnet50"), doc="torchvision ResNet")
    init: str = param("random", doc="random | imagenet | path to a cxrtune checkpoint")
    weights: str | None = param(None, doc="local torchvision weights file for init=imagenet (nothing is downloaded)")
    in_chans: int = param(1, choices=(1, 3), doc="1: greyscale stem (ImageNet filters summed); 3: grey replicated")


@dataclass
class OptimConfig(Config):
    optimizer: str = param("sgd", choices=("sgd", "adamw", "lars"),
                           doc="lars: SGD with a layer-wise trust ratio, for large batches (biases and norms not adapted)")
    lr: float = param(0.045, low=0, low_open=True, doc="peak learning rate after warmup (not scaled by batch)")
    weight_decay: float = param(1e-4, low=0)
    momentum: float = param(0.9, low=0, high=1, high_open=True, doc="SGD and LARS momentum")
    lars_eta: float = param(0.001, low=0, low_open=True, doc="LARS trust coefficient")
    beta1: float = param(0.9, low=0, high=1, high_open=True, doc="AdamW beta1")
    beta2: float = param(0.999, low=0, high=1, high_open=True, doc="AdamW beta2")
    warmup_epochs: float = param(10.0, low=0, doc="linear warmup from 0, then the schedule")
    min_lr_ratio: float = param(0.0, low=0, high=1, doc="final lr (cosine) or cooldown floor (wsd) as a fraction of the peak")
    schedule: str = param("cosine", choices=("cosine", "wsd"),
                          doc="cosine: decay over the whole run; wsd: warmup, then the peak, every checkpoint judged "
                              "on a cooldown branch (cxrtune.engine.cooldown)")
    cooldown_fraction: float = param(0.15, low=0, high=1, low_open=True,
                                     doc="wsd: a checkpoint's cooldown branch trains this share of the steps done so far")
    cooldown_shape: str = param("sqrt", choices=("sqrt", "linear"), doc="wsd: the cooldown's decay, 1-sqrt or linear")
    clip_grad_norm: float = param(3.0, low=0, doc="max gradient norm (0 = no clipping)")
    exclude_norm_bias_decay: bool = param(False, doc="no weight decay on biases and normalisation weights")


@dataclass
class TrainConfig(Config):
    epochs: int = param(800, low=1)
    batch_size: int = param(384, low=2)
    image_size: int = param(224, low=16, doc="side of the training views (px)")
    seed: int = param(0, low=0)
    device: str = param("auto", doc="auto | cpu | cuda | cuda:N")
    precision: str = param("auto", choices=("auto", "bf16", "fp32"), doc="auto: bf16 autocast on CUDA, fp32 on CPU")
    channels_last: bool = param(True, doc="NHWC memory format (applied on CUDA only)")
    compile: bool = param(False, doc="torch.compile the encoders' ResNet trunks; heads, the MoCo queue and EMA updates "
                                     "stay eager (the study's whole-model compile broke on the queue update)")
    grad_checkpointing: bool = param(False, doc="recompute activations in backward to save memory")
    checkpoint_every: int = param(10, low=1, doc="epochs between checkpoints (the last epoch always saves)")
    checkpoint_epochs: tuple[int, ...] = param((), low=1, doc="further epochs that save a checkpoint (a sweep's "
                                               "rungs: with the wsd schedule, where cooldown branches judge)")
    keep_checkpoints: int = param(3, low=1, doc="how many recent checkpoints to keep")
    monitor_images: int = param(512, low=8, doc="fixed images for the collapse monitors")
    monitor_pairs: int = param(2048, low=1, doc="random pairs for the mean pairwise cosine")
    time_limit_minutes: float = param(0.0, low=0, doc="stop (with a checkpoint) after the epoch that passes this; 0 = none")
    loss_check_every: int = param(10, low=1, doc="steps between NaN/inf checks on CUDA (every step on CPU)")
    prefetch: int = param(2, low=0, doc="batches gathered ahead on a background thread into reusable (pinned) "
                                        "buffers, copied on a side CUDA stream; 0 = on the training thread")


@dataclass
class PretrainConfig(Config):
    method: str = param("moco", doc="a registered method (cxrtune.methods)")
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    #: the method's own block, flattened under the method's name (``moco.temperature``)
    block: Config | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        entry = get_method(self.method)
        if self.block is None:
            self.block = entry.config()
        elif isinstance(self.block, Mapping):
            self.block = entry.config.from_dict(self.block)
        elif not isinstance(self.block, entry.config):
            raise ConfigError(f"method {self.method} takes a {entry.config.__name__} block, not a "
                              f"{type(self.block).__name__}")
        super().__post_init__()

    def __getattr__(self, name: str) -> Any:
        # config.moco is the block of a MoCo config; another method's name has no block here
        if name in ("block", "method") or name.startswith("__"):
            raise AttributeError(name)
        if name == self.method:
            return self.block
        if name in method_names():
            raise AttributeError(f"a {self.method} config has no {name!r} block: a config holds its method's block only")
        raise AttributeError(name)

    def method_config(self) -> Config:
        return self.block

    def validate(self) -> None:
        get_method(self.method).cls.check_config(self)

    def _sections(self) -> list[tuple[str, Any]]:
        """(flat name, value) in key order: method, model, the method's block, optim, train, augment."""
        return [("method", self.method), ("model", self.model), (self.method, self.block), ("optim", self.optim),
                ("train", self.train), ("augment", self.augment)]

    def to_dict(self) -> dict[str, Any]:
        return {name: value.to_dict() if isinstance(value, Config) else value for name, value in self._sections()}

    def to_flat(self, prefix: str = "") -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name, value in self._sections():
            if isinstance(value, Config):
                flat.update(value.to_flat(prefix=f"{prefix}{name}."))
            else:
                flat[f"{prefix}{name}"] = value
        return flat

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PretrainConfig":
        data = dict(data)
        method = data.pop("method", "moco")
        get_method(method)
        block = data.pop(method, None)
        sections = {f.name for f in dataclasses.fields(cls)} - {"method", "block"}
        for key in data:
            if key in method_names():
                raise ConfigError(f"a {method} config has no {key!r} block: a config holds its method's block only "
                                  f"({method}.*); set method = {key!r} to configure {key}")
            if key not in sections:
                raise ConfigError(f"PretrainConfig has no field {key!r}: valid fields are method, {method}, "
                                  f"{', '.join(sorted(sections))}")
        return cls(method=method, block=block, **data)

    def override(self, flat: Mapping[str, Any]) -> "PretrainConfig":
        """A copy with dotted keys replaced. A new ``method`` starts its block from the method's
        defaults; keys of another method's block are refused, naming the method they belong to."""
        flat = dict(flat)
        method = flat.pop("method", self.method)
        base = self
        if method != self.method:
            get_method(method)
            base = PretrainConfig(method=method, model=self.model, optim=self.optim, train=self.train,
                                  augment=self.augment)
        merged = base.to_flat()
        for key in flat:
            if key not in merged:
                owner = key.split(".", 1)[0]
                if owner in method_names() and owner != method:
                    raise ConfigError(f"config key {key!r} belongs to method {owner}; this config's method is "
                                      f"{method}, whose keys are {method}.*")
                raise ConfigError(f"unknown config key {key!r} for PretrainConfig ({method}): "
                                  f"valid keys are {', '.join(sorted(merged))}")
        merged.update(flat)
        return type(self).from_dict(unflatten(merged))

    @classmethod
    def describe(cls, method: str = "moco") -> list[tuple[str, str, str, str]]:
        rows = Config.describe.__func__(cls)
        rows = [r for r in rows if not r[0].startswith("block")]
        block = [(f"{method}.{name}", *rest) for name, *rest in get_method(method).config.describe()]
        return rows[:1] + block + rows[1:]
