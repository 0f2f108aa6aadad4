"""Profiles: one vocabulary of named budgets for ``cxrtune pretrain``, the pretraining sweeps and
the few-shot sweeps. ``--profile cpu`` trains the same config in all three.

A profile names

- ``preset``: the preset each method contributes (:mod:`cxrtune.methods.registry`: study, cpu, smoke);
- ``scale``: config keys every method shares at this scale (image size, backbone, crops),
  applied after the method's study recipe and before its preset;
- ``budget``: config keys of this budget (epochs, checkpoints, time limit), applied after the
  method's preset; a method's own keys (``moco.queue_size``) apply to that method only;
- ``probe``: the in-loop few-shot probe of a pretraining trial (``probe.*`` config keys);
- the data scale (cache side, phantom options), the sweep's trials and resources, and the
  few-shot sweeps' settings (``eval.*`` keys).

How the layers combine, with the provenance of every value, is :mod:`cxrtune.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from cxrtune.errors import ConfigError

#: 64 px on two CPU cores: ResNet18, milder crops (a 64 px crop of 8 % of the image holds almost
#: nothing), a blur kernel scaled to the image, and a 55-minute time limit.
_CPU_SCALE: dict[str, Any] = {
    "model.arch": "resnet18", "train.image_size": 64, "train.batch_size": 64, "train.epochs": 30,
    "train.checkpoint_every": 5, "train.monitor_images": 256, "train.time_limit_minutes": 55.0,
    "train.channels_last": False, "optim.warmup_epochs": 2,
    "augment.crop_scale_min": 0.3, "augment.brightness": 0.4, "augment.contrast": 0.4,
    "augment.blur_kernel": 3, "augment.blur_sigma_max": 0.7,
}
#: Seconds on a CPU: tiny images, batches, heads and queue.
_SMOKE_SCALE: dict[str, Any] = {
    "model.arch": "resnet18", "train.image_size": 32, "train.batch_size": 16, "train.epochs": 2,
    "train.checkpoint_every": 1, "train.monitor_images": 16, "train.monitor_pairs": 64,
    "train.channels_last": False, "optim.warmup_epochs": 1, "augment.blur_kernel": 3,
}
#: The sweeps' and ``cxrtune pretrain --profile smoke``'s small phantom (502 images).
SMOKE_PHANTOM: dict[str, Any] = {"n_pretrain": 192, "studies_per_patient": 4, "train_pos": 20, "val_pos": 4,
                                 "train_neg": 40, "val_neg": 30, "fewshot_studies": 1}
_FULL_GRID = (1, 5, 10, 20, 50)


@dataclass(frozen=True)
class Profile:
    name: str
    note: str
    fewshot_note: str
    preset: str
    cache_size: int
    budget: Mapping[str, Any]
    probe: Mapping[str, Any]
    #: trials, concurrency, ASHA grace period, resources per trial; ``profile_point``: also
    #: evaluate the method's own preset values of the searched keys
    sweep: Mapping[str, Any]
    fewshot: Mapping[str, Any]
    scale: Mapping[str, Any] = field(default_factory=dict)
    phantom: Mapping[str, Any] = field(default_factory=dict)
    fewshot_phantom: Mapping[str, Any] = field(default_factory=lambda: {"n_pretrain": 0})
    gpu: bool = False


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", preset="smoke", scale=_SMOKE_SCALE,
        budget={"train.keep_checkpoints": 1},
        probe={"probe.shots": (5, 20), "probe.trials": 2, "probe.input_size": 32},
        cache_size=32, phantom=SMOKE_PHANTOM,
        # grace period = epochs: ASHA never stops a smoke trial, so a smoke run is deterministic
        sweep={"num_samples": 2, "max_concurrent": 2, "grace_period": 2, "resources": {"cpu": 1}},
        fewshot={"eval.input_size": 32, "eval.crop_fraction": 1.0, "eval.finetune.epochs": 1,
                 "eval.shots": (1, 5), "eval.trials": 2},
        fewshot_phantom={"n_pretrain": 0, "train_pos": 6, "val_pos": 4, "train_neg": 40, "val_neg": 30,
                         "fewshot_studies": 1},
        note="a plumbing check: 32 px, two epochs, a 502-image phantom; its numbers mean nothing",
        fewshot_note="a plumbing check on tiny images; its AUROCs mean nothing"),
    "default": Profile(
        name="default", preset="cpu", scale=_CPU_SCALE,
        budget={"train.epochs": 3, "train.checkpoint_every": 1, "train.time_limit_minutes": 3.0,
                "train.keep_checkpoints": 1, "optim.warmup_epochs": 1, "moco.queue_size": 1024},
        probe={"probe.shots": (5, 20), "probe.trials": 3, "probe.input_size": 64},
        cache_size=64,
        phantom={"n_pretrain": 2048, "train_pos": 40, "val_pos": 20, "train_neg": 400, "val_neg": 200},
        sweep={"num_samples": 4, "max_concurrent": 2, "grace_period": 1, "resources": {"cpu": 1}},
        fewshot={"eval.input_size": 64, "eval.crop_fraction": 1.0, "eval.finetune.epochs": 5,
                 "eval.shots": _FULL_GRID, "eval.trials": 5},
        note=("minutes of CPU pretraining learn little: this run shows the whole workflow (search, tracking, "
              "comparison with random init, export), not a gain over random init; use --profile cpu (about an "
              "hour) for that"),
        fewshot_note="the full shot grid at 64 px on CPU"),
    "cpu": Profile(
        # Two trials side by side, one core each, ~20 epochs of the 10,000 pretraining images in
        # under an hour. Every held-out image is in each test set so that a gain of a few AUROC
        # points resolves.
        name="cpu", preset="cpu", scale=_CPU_SCALE,
        budget={"train.epochs": 20, "train.checkpoint_every": 4, "train.time_limit_minutes": 56.0},
        probe={"probe.shots": (5, 20), "probe.trials": 10, "probe.test_negatives": "all", "probe.input_size": 64},
        cache_size=64,
        sweep={"num_samples": 2, "max_concurrent": 2, "grace_period": 20, "resources": {"cpu": 1},
               "profile_point": True},
        fewshot={"eval.input_size": 64, "eval.crop_fraction": 1.0, "eval.finetune.epochs": 20,
                 "eval.shots": _FULL_GRID, "eval.trials": 10},
        note=("about an hour on 2 CPU cores: 20 epochs at 64 px; as a sweep, two trials side by side (the study's "
              "setting and the method's cpu preset), judged on every held-out image; on phantom version 6 the "
              "MoCo sweep's best trial measured +0.058 AUROC over random init, 95% CI [+0.018, +0.101]; the gain is "
              "small and one run does not always show it"),
        fewshot_note="the study's grid (10 trials) at 64 px"),
    "l4": Profile(
        # A budget, not the study's schedule: trials of at most 200 epochs on warmup-stable-decay,
        # judged at ASHA's rungs (12, 36, 108) on cooldown branches, planned to 48 GPU hours. At
        # the study's L4 rate (MoCo ResNet50, 63 h for 800 epochs) that is a wide search at 12
        # epochs and about one run of 200 epochs; the study's recipe itself is --profile study.
        name="l4", preset="study",
        budget={"train.epochs": 200, "train.checkpoint_every": 10, "optim.schedule": "wsd",
                "optim.cooldown_fraction": 0.15},
        probe={"probe.shots": (5, 20), "probe.trials": 10, "probe.input_size": 224},
        cache_size=256,
        sweep={"num_samples": 16, "max_concurrent": 1, "grace_period": 12, "reduction": 3, "budget_hours": 48.0,
               "resources": {"cpu": 8, "gpu": 1}},
        fewshot={"eval.input_size": 224, "eval.crop_fraction": 224 / 256, "eval.finetune.epochs": 100,
                 "eval.shots": _FULL_GRID, "eval.trials": 10},
        gpu=True,
        note=("one 24 GB GPU, planned to 48 GPU hours (--budget-hours): the study's recipe at up to 200 epochs on "
              "warmup-stable-decay, a wide search at 12 epochs, the best promoted to 36, 108 and 200"),
        fewshot_note="the study's protocol at 224 px (finetuning 100 epochs)"),
}
#: ``study``: the methods' full recipes as published, at 224 px from 256 px images, 16 trials, no budget.
PROFILES["study"] = Profile(**{**PROFILES["l4"].__dict__, "name": "study", "budget": {"train.checkpoint_every": 10},
                               "sweep": {"num_samples": 16, "max_concurrent": 1, "grace_period": 50,
                                         "resources": {"cpu": 8, "gpu": 1}},
                               "note": "the study's full recipe of each method at 224 px (GPU days per run)"})


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ConfigError(f"profile = {name!r} is not known: use one of {', '.join(PROFILES)}")
    return PROFILES[name]


def profile_notes(kind: str = "pretrain") -> str:
    """``--help`` text: one line per profile."""
    return "\n".join(f"  {p.name:<8} {p.fewshot_note if kind == 'fewshot' else p.note}" for p in PROFILES.values())


def pretrain_config(name: str, method: str = "moco"):
    """The :class:`~cxrtune.engine.config.PretrainConfig` profile ``name`` trains ``method`` with."""
    from cxrtune.resolve import resolve_pretrain

    return resolve_pretrain(name, method).pretrain


def study(method: str = "moco"):
    return pretrain_config("study", method)


def cpu(method: str = "moco"):
    return pretrain_config("cpu", method)


def smoke(method: str = "moco"):
    return pretrain_config("smoke", method)
