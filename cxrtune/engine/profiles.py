"""Named starting points: ``study`` (the study's settings), ``cpu`` (learns on 2 CPU cores within
an hour at 64 px), ``smoke`` (seconds, for tests). Each takes the method name and returns a
:class:`PretrainConfig`; override further with ``config.override({"optim.lr": 0.1})``.
"""

from __future__ import annotations

from typing import Any, Callable

from cxrtune.engine.config import METHOD_NAMES, PretrainConfig
from cxrtune.errors import ConfigError

#: The study's recipes at 224 px (seed-facts, "Methods and settings that worked").
#: BarlowTwins' and DINO's photometric recipe was not recorded separately: MoCo's is used.
_STUDY: dict[str, dict[str, Any]] = {
    "moco": {
        "model.arch": "resnet50", "train.batch_size": 384, "train.epochs": 800,
        "optim.optimizer": "sgd", "optim.lr": 0.045, "optim.weight_decay": 1e-4, "optim.warmup_epochs": 10,
        "optim.clip_grad_norm": 3.0,
    },
    "barlow": {
        "model.arch": "resnet18", "train.batch_size": 512, "train.epochs": 200, "train.grad_checkpointing": True,
        "optim.optimizer": "adamw", "optim.lr": 2.4e-3, "optim.weight_decay": 1e-4, "optim.warmup_epochs": 10,
        "optim.clip_grad_norm": 0.0,
    },
    "spark": {
        "model.arch": "resnet50", "train.batch_size": 256, "train.epochs": 200,
        "optim.optimizer": "adamw", "optim.lr": 3e-4, "optim.weight_decay": 0.05, "optim.warmup_epochs": 10,
        "optim.clip_grad_norm": 0.0,
        # SparK's own recipe: a mild crop and a flip, nothing photometric.
        "augment.crop_scale_min": 0.67, "augment.rotation_deg": 0.0, "augment.jitter_p": 0.0,
        "augment.blur_p": 0.0, "augment.noise_std": 0.0,
    },
    "dino": {
        "model.arch": "resnet50", "train.batch_size": 64, "train.epochs": 100,
        "optim.optimizer": "adamw", "optim.lr": 5e-4, "optim.weight_decay": 0.04, "optim.warmup_epochs": 10,
        "optim.clip_grad_norm": 3.0, "augment.crop_scale_min": 0.4,
    },
}

#: 64 px on two CPU cores: ResNet18, small heads and queue, milder crops (a 64 px crop of 8 % of
#: the image holds almost nothing), a blur kernel scaled to the image, checkpoints every 5 epochs,
#: and a 55-minute time limit so a run fits an hour with its start-up and evaluation.
_CPU_COMMON: dict[str, Any] = {
    "model.arch": "resnet18", "train.image_size": 64, "train.batch_size": 64, "train.epochs": 30,
    "train.checkpoint_every": 5, "train.monitor_images": 256, "train.time_limit_minutes": 55.0,
    "train.channels_last": False, "optim.warmup_epochs": 2,
    "augment.crop_scale_min": 0.3, "augment.brightness": 0.4, "augment.contrast": 0.4,
    "augment.blur_kernel": 3, "augment.blur_sigma_max": 0.7,
}
_CPU: dict[str, dict[str, Any]] = {
    # No flip, and crops that keep the body's size and proportions (80-100 % of the image, aspect
    # 0.9-1.11): a flip alone halves the share of augmented views whose nearest neighbour is their
    # own source (bench/phantom_retrieval.py), and body size and lung height carry findings (the
    # phantom's clinical correlates). Measured with bench/ssl_vs_random.py on phantom version 6,
    # seeds 0 and 1: SSL 0.575 / 0.568 with these crops against 0.555 / 0.553 with crops of 50-100 %
    # at aspect 3/4-4/3 (random init 0.539 / 0.544); docs/performance.md.
    "moco": {"moco.projector_hidden": 512, "moco.queue_size": 4096, "moco.momentum": 0.99, "moco.temperature": 0.2,
             "optim.optimizer": "sgd", "optim.lr": 0.06, "optim.weight_decay": 5e-4, "optim.clip_grad_norm": 3.0,
             "augment.hflip_p": 0.0, "augment.crop_scale_min": 0.8, "augment.crop_ratio_min": 0.9,
             "augment.crop_ratio_max": 1.111},
    "barlow": {"barlow.projector_dims": [512, 512, 512], "optim.optimizer": "adamw", "optim.lr": 1e-3,
               "optim.weight_decay": 1e-4, "optim.clip_grad_norm": 0.0},
    "spark": {"spark.patch_size": 8, "spark.decoder_width": 128, "optim.optimizer": "adamw", "optim.lr": 5e-4,
              "optim.weight_decay": 0.05, "optim.clip_grad_norm": 0.0, "augment.crop_scale_min": 0.67,
              "augment.rotation_deg": 0.0, "augment.jitter_p": 0.0, "augment.blur_p": 0.0, "augment.noise_std": 0.0},
    "dino": {"dino.hidden_dim": 512, "dino.bottleneck_dim": 128, "dino.local_crop_size": 32,
             "optim.optimizer": "adamw", "optim.lr": 5e-4, "optim.weight_decay": 0.04, "optim.clip_grad_norm": 3.0,
             "augment.crop_scale_min": 0.4},
}

#: Seconds on a CPU: tiny images, batches, heads and queue.
_SMOKE_COMMON: dict[str, Any] = {
    "model.arch": "resnet18", "train.image_size": 32, "train.batch_size": 8, "train.epochs": 2,
    "train.checkpoint_every": 1, "train.monitor_images": 16, "train.monitor_pairs": 64,
    "train.channels_last": False, "optim.warmup_epochs": 1, "augment.blur_kernel": 3,
}
_SMOKE: dict[str, dict[str, Any]] = {
    "moco": {"moco.projector_hidden": 64, "moco.projector_out": 32, "moco.queue_size": 64, "moco.momentum": 0.99,
             "optim.lr": 0.03},
    "barlow": {"barlow.projector_dims": [64, 64], "optim.optimizer": "adamw", "optim.lr": 1e-3},
    "spark": {"spark.patch_size": 8, "spark.decoder_width": 32, "optim.optimizer": "adamw", "optim.lr": 1e-3},
    "dino": {"dino.out_dim": 64, "dino.hidden_dim": 64, "dino.bottleneck_dim": 32, "dino.local_crops": 2,
             "dino.local_crop_size": 16, "optim.optimizer": "adamw", "optim.lr": 1e-3},
}


def _check(method: str) -> None:
    if method not in METHOD_NAMES:
        raise ConfigError(f"method = {method!r} is not known: use one of {', '.join(METHOD_NAMES)}")


def study(method: str = "moco") -> PretrainConfig:
    _check(method)
    return PretrainConfig(method=method).override(_STUDY[method])


def cpu(method: str = "moco") -> PretrainConfig:
    _check(method)
    return study(method).override({**_CPU_COMMON, **_CPU[method]})


def smoke(method: str = "moco") -> PretrainConfig:
    _check(method)
    return study(method).override({**_SMOKE_COMMON, **_SMOKE[method]})


PROFILES: dict[str, Callable[[str], PretrainConfig]] = {"study": study, "cpu": cpu, "smoke": smoke}


def profile(name: str, method: str = "moco") -> PretrainConfig:
    if name not in PROFILES:
        raise ConfigError(f"profile = {name!r} is not known: use one of {', '.join(PROFILES)}")
    return PROFILES[name](method)
