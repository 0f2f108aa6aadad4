"""The configuration of one pretraining run: one dataclass per concern, flattening to dotted keys.

``PretrainConfig().to_flat()`` gives keys such as ``method``, ``moco.variance_weight``,
``optim.lr``, ``train.epochs``, ``augment.crop_scale_min``: what a sweep overrides and what MLflow
logs. Every method's block is present whichever method runs, so one flat schema covers a sweep
across methods. The study's per-method settings (architecture, optimiser, recipe) are in
:mod:`cxrtune.engine.profiles`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cxrtune.augment import AugmentConfig
from cxrtune.config import Config, param
from cxrtune.errors import ConfigError
from cxrtune.methods import BarlowConfig, DinoConfig, MocoConfig, SparkConfig

METHOD_NAMES = ("moco", "barlow", "spark", "dino")


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
    warmup_epochs: float = param(10.0, low=0, doc="linear warmup from 0, then cosine")
    min_lr_ratio: float = param(0.0, low=0, high=1, doc="final lr as a fraction of the peak")
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
    compile: bool = param(False, doc="torch.compile the encoders (the study's compile broke on the queue)")
    grad_checkpointing: bool = param(False, doc="recompute activations in backward to save memory")
    checkpoint_every: int = param(10, low=1, doc="epochs between checkpoints (the last epoch always saves)")
    keep_checkpoints: int = param(3, low=1, doc="how many recent checkpoints to keep")
    monitor_images: int = param(512, low=8, doc="fixed images for the collapse monitors")
    monitor_pairs: int = param(2048, low=1, doc="random pairs for the mean pairwise cosine")
    time_limit_minutes: float = param(0.0, low=0, doc="stop (with a checkpoint) after the epoch that passes this; 0 = none")
    loss_check_every: int = param(10, low=1, doc="steps between NaN/inf checks on CUDA (every step on CPU)")


@dataclass
class PretrainConfig(Config):
    method: str = param("moco", choices=METHOD_NAMES)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    barlow: BarlowConfig = field(default_factory=BarlowConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def method_config(self) -> Config:
        return getattr(self, self.method)

    def validate(self) -> None:
        size = self.train.image_size
        if self.method == "spark" and (size % self.spark.patch_size or size % 32):
            raise ConfigError(
                f"train.image_size = {size} must be a multiple of 32 and of spark.patch_size = {self.spark.patch_size} for SparK")
        if self.method == "dino" and self.dino.local_crops and self.dino.local_crop_size > size:
            raise ConfigError(f"dino.local_crop_size = {self.dino.local_crop_size} exceeds train.image_size = {size}")
