"""One pretraining run: uint8 cache in, checkpoints and a metrics JSONL out.

``pretrain(config, images, run_dir)`` samples batches of cache rows with a seeded generator,
gathers them ahead of the step on a background thread and moves them to the device as uint8
(:mod:`cxrtune.engine.prefetch`), lets the method augment and compute its loss there, and steps the optimiser with warmup + cosine (or warmup-stable-decay, whose checkpoints are
judged on cooldown branches: :mod:`cxrtune.engine.cooldown`), gradient clipping and bf16 autocast on CUDA.
After every epoch it measures collapse on fixed images, appends a line to ``metrics.jsonl``,
every ``checkpoint_every`` epochs (and at ``checkpoint_epochs``) writes a checkpoint, then calls
``callback(metrics)`` with the checkpoint's path under ``"checkpoint"`` (None on epochs without one)
and ``"judged"``: whether the checkpoint offers a backbone to judge (a wsd run with
``checkpoint_epochs`` judges only there and at its last epoch; its other checkpoints are for
resuming); the callback may answer
``"stop"``, which saves a checkpoint if the epoch had none. A run started again in the same ``run_dir`` resumes from the latest
checkpoint and continues exactly as if never interrupted (same batches, views, weights).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from cxrtune.augment import BatchAugment
from cxrtune.device import resolve_device
from cxrtune.engine.checkpoint import (FORMAT, checkpoint_path, latest_checkpoint, list_checkpoints,
                                       load_checkpoint, save_checkpoint)
from cxrtune.engine.config import PretrainConfig
from cxrtune.engine.lars import LARS
from cxrtune.engine.monitors import CollapseMonitor
from cxrtune.engine.cooldown import cooldown_steps, run_cooldown
from cxrtune.engine.prefetch import device_batches
from cxrtune.engine.schedules import build_schedule
from cxrtune.errors import ConfigError, DataError, DivergenceError
from cxrtune.methods import Progress, SSLMethod, build_method
from cxrtune.models.backbone import Backbone, CheckpointError, build_backbone

METRICS_FILE = "metrics.jsonl"
#: Keys that may change between a run and its resume without breaking exactness.
RESUME_MAY_DIFFER = frozenset({"train.device", "train.time_limit_minutes", "train.keep_checkpoints",
                               "train.checkpoint_every", "train.checkpoint_epochs", "train.loss_check_every",
                               "train.compile", "train.prefetch",
                               "optim.cooldown_fraction", "optim.cooldown_shape"})
#: Seed offsets so the sampler, the views and the monitor pairs draw from separate streams.
_AUGMENT_SEED_OFFSET = 1
_BRANCH_SEED_OFFSET = 7919
_MONITOR_SEED = 12345

Callback = Callable[[dict[str, Any]], Any]


@dataclass
class PretrainResult:
    run_dir: Path
    epochs_completed: int
    status: str                      # completed | stopped | time_limit
    checkpoint: Path | None          # the latest checkpoint written
    metrics: list[dict[str, Any]] = field(default_factory=list)   # one dict per epoch of this call
    backbone: Backbone | None = None # the trained backbone, on the CPU


# -- set-up -----------------------------------------------------------------------------------------
def _as_config(config: PretrainConfig | Mapping[str, Any]) -> PretrainConfig:
    if isinstance(config, PretrainConfig):
        return config
    if isinstance(config, Mapping):
        return PretrainConfig.from_flat(config) if any("." in k for k in config) else PretrainConfig.from_dict(config)
    raise ConfigError(f"config must be a PretrainConfig or a flat dict, got {type(config).__name__}")


def _check_images(images: Any, rows: Sequence[int] | np.ndarray | None, batch_size: int) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3 \
            or images.shape[1] != images.shape[2]:
        what = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise DataError(f"images must be a uint8 array (N, S, S) from the image cache, got {what}")
    n = images.shape[0]
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0:
        raise DataError("rows must be a non-empty list of cache row indices")
    if rows.min() < 0 or rows.max() >= n:
        raise DataError(f"rows must lie in [0, {n - 1}] (the cache has {n} images); got {rows.min()}..{rows.max()}")
    if len(rows) < batch_size:
        raise DataError(f"{len(rows)} training images are fewer than train.batch_size = {batch_size}: "
                        "lower the batch size or train on more images")
    return rows


def build_optimizer(method: SSLMethod, config: PretrainConfig) -> torch.optim.Optimizer:
    o = config.optim
    params = [p for p in method.parameters() if p.requires_grad]
    if o.exclude_norm_bias_decay or o.optimizer == "lars":
        # biases and normalisation weights (1-D) apart: no decay if asked, and never LARS-adapted
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": o.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0 if o.exclude_norm_bias_decay else o.weight_decay}]
    else:
        groups = [{"params": params, "weight_decay": o.weight_decay}]
    # one fused kernel per parameter group on CUDA instead of a foreach chain (same update)
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, **fused)
    if o.optimizer == "lars":
        groups[1]["adapt"] = False
        return LARS(groups, lr=o.lr, momentum=o.momentum, eta=o.lars_eta)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), **fused)


def _epoch_order(rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shuffled rows: a function of (seed, epoch) only, so a resume needs no state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return rows[torch.randperm(len(rows), generator=g).numpy()]


def _epoch_batches(order: np.ndarray, batch_size: int, steps: int):
    """The rows of each of ``steps`` batches of an epoch's ``order``."""
    return (order[i * batch_size:(i + 1) * batch_size] for i in range(steps))


def _branch_rows(rows: np.ndarray, batch_size: int, seed: int, done: int):
    """A cooldown branch's batches of rows: orders of their own, seeded by the epoch the branch starts from."""
    chunk = 0
    while True:
        yield from _epoch_batches(_epoch_order(rows, seed, done * 10_000 + chunk), batch_size, len(rows) // batch_size)
        chunk += 1


def _monitor_rows(rows: np.ndarray, count: int) -> np.ndarray:
    g = torch.Generator().manual_seed(_MONITOR_SEED)
    chosen = rows[torch.randperm(len(rows), generator=g).numpy()[:count]]
    return np.sort(chosen)


# -- checkpoints -------------------------------------------------------------------------------------
def _rng_state(augment_generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "augment": augment_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], augment_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    augment_generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _payload(method: SSLMethod, config: PretrainConfig, optimizer, schedule, augment_generator,
             epoch: int, metrics: dict[str, Any] | None) -> dict[str, Any]:
    backbone = method.backbone
    rest = {k: v.detach().cpu() for k, v in method.state_dict().items() if not k.startswith("backbone.")}
    return {
        "format": FORMAT,
        "arch": backbone.arch,
        "in_chans": backbone.in_chans,
        "backbone": {k: v.cpu() for k, v in backbone.torchvision_state_dict().items()},
        "method": method.name,
        "config": config.to_flat(),
        "epoch": epoch,
        "method_state": rest,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": _rng_state(augment_generator),
        "meta": {"method": method.name, "epoch": epoch, "metrics": dict(metrics or {})},
    }


def _check_resumable(payload: Mapping[str, Any], config: PretrainConfig, path: Path) -> None:
    saved, current = payload["config"], config.to_flat()
    defaults = PretrainConfig().to_flat()
    # a setting added after the checkpoint was written, at its default, cannot have changed the run
    differing = sorted(k for k in set(saved) | set(current)
                       if k not in RESUME_MAY_DIFFER and saved.get(k) != current.get(k)
                       and not (k not in saved and k in defaults and current.get(k) == defaults[k]))
    if differing:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing[:5])
        raise CheckpointError(
            f"cannot resume from {path}: the config differs ({shown}); use a new run_dir or resume=False")


def _restore(payload: Mapping[str, Any], method: SSLMethod, optimizer, schedule, augment_generator) -> None:
    state = dict(payload["method_state"])
    state.update({f"backbone.trunk.{k}": v for k, v in payload["backbone"].items()})
    method.load_state_dict(state, strict=True)
    optimizer.load_state_dict(payload["optimizer"])
    schedule.load_state_dict(payload["schedule"])
    _set_rng_state(payload["rng"], augment_generator)


def _rewrite_metrics(path: Path, up_to_epoch: int) -> None:
    """Drop metric lines of epochs after the checkpoint we resume from (they will be redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= up_to_epoch]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


# -- the loop ------------------------------------------------------------------------------------------
def optimizer_step(method: SSLMethod, optimizer: torch.optim.Optimizer, loss: torch.Tensor, where: Progress,
                   clip_grad_norm: float = 0.0) -> None:
    """Backward and one optimiser step with the method's hooks around it (freezing, EMA updates),
    as the training loop runs it; the benchmarks and tests step through this too."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.before_optimizer_step(where)
    if clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(method.parameters(), clip_grad_norm)
    optimizer.step()
    method.after_optimizer_step(where)


def pretrain(config: PretrainConfig | Mapping[str, Any], images: np.ndarray, run_dir: str | Path, *,
             rows: Sequence[int] | np.ndarray | None = None, callback: Callback | None = None,
             resume: bool = True, progress: bool = False) -> PretrainResult:
    """Pretrain ``config.method`` on ``images[rows]``; see the module docstring.

    Raises :class:`DivergenceError` when the loss becomes NaN or infinite.
    """
    config = _as_config(config)
    t = config.train
    rows = _check_images(images, rows, t.batch_size)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(t.device, "train.device")
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type != "cuda":
        raise ConfigError("train.precision = 'bf16' is supported on CUDA only here: use auto or fp32 on CPU")

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its algorithms once and keeps the fastest
    torch.manual_seed(t.seed)
    backbone = build_backbone(config.model.arch, config.model.init, config.model.weights, config.model.in_chans)
    method = build_method(config.method, backbone, config.method_config())
    method.to(device)
    if t.channels_last and device.type == "cuda":
        method.to(memory_format=torch.channels_last)
        for module in method.modules():
            if isinstance(module, Backbone):
                module.channels_last = True
    backbone.grad_checkpointing = t.grad_checkpointing

    steps_per_epoch = len(rows) // t.batch_size
    optimizer = build_optimizer(method, config)
    schedule = build_schedule(config.optim.schedule, config.optim.lr, round(config.optim.warmup_epochs * steps_per_epoch),
                              steps_per_epoch * t.epochs, config.optim.min_lr_ratio)
    generator = torch.Generator(device=device).manual_seed(t.seed + _AUGMENT_SEED_OFFSET)
    augment = BatchAugment(config.augment, t.image_size, generator)
    monitor = CollapseMonitor(images[_monitor_rows(rows, t.monitor_images)], t.image_size, device,
                              pairs=t.monitor_pairs, seed=_MONITOR_SEED)

    start_epoch = 0
    resumed_judged = None
    if not resume:  # starting afresh: older checkpoints would otherwise be mistaken for this run's
        for _, old in list_checkpoints(run_dir):
            old.unlink()
    last_checkpoint = latest_checkpoint(run_dir) if resume else None
    if last_checkpoint is not None:
        payload = load_checkpoint(last_checkpoint)
        _check_resumable(payload, config, last_checkpoint)
        _restore(payload, method, optimizer, schedule, generator)
        start_epoch = int(payload["epoch"])
        resumed_judged = payload.get("judged_backbone")
        del payload
    _rewrite_metrics(run_dir / METRICS_FILE, start_epoch)
    (run_dir / "config.json").write_text(json.dumps(config.to_flat(), indent=1, sort_keys=True))

    if t.compile:
        method.compile_encoders(lambda module: module.compile())

    def judge(done: int, where: Progress, metrics: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """With the wsd schedule, the backbone of a cooldown branch off the state after ``done`` epochs."""
        if config.optim.schedule != "wsd":
            return None
        steps = cooldown_steps(config.optim.cooldown_fraction, done * steps_per_epoch)
        branch_seed = t.seed + _BRANCH_SEED_OFFSET
        branch_augment = BatchAugment(config.augment, t.image_size,
                                      torch.Generator(device=device).manual_seed(branch_seed * 1_000_003 + done))
        branch_rows = _branch_rows(rows, t.batch_size, branch_seed, done)
        with contextlib.closing(device_batches(images, branch_rows, device, t.prefetch)) as batches:
            judged, loss = run_cooldown(method, optimizer, batches, branch_augment, where,
                                        schedule.lr_at(done * steps_per_epoch),
                                        config.optim.min_lr_ratio * config.optim.lr, steps, config.optim.cooldown_shape,
                                        lambda m, o, loss, w: optimizer_step(m, o, loss, w, config.optim.clip_grad_norm),
                                        use_bf16, device, check_every=check_every)
        metrics.update(cooldown_steps=steps, cooldown_loss=loss)
        return judged

    def save(done: int, metrics: dict[str, Any], judged: dict[str, torch.Tensor] | None) -> Path:
        payload = _payload(method, config, optimizer, schedule, generator, done, metrics)
        if judged is not None:
            payload["judged_backbone"] = judged  # what the checkpoint offers; "backbone" is the main trajectory's
        return save_checkpoint(payload, checkpoint_path(run_dir, done), keep=t.keep_checkpoints)

    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    status = "completed"
    done = start_epoch
    judged = resumed_judged  # a finished run started again offers what its last checkpoint offered
    check_every = 1 if device.type == "cpu" else t.loss_check_every
    for epoch in range(start_epoch, t.epochs):
        epoch_start = time.perf_counter()
        method.train()
        order = _epoch_order(rows, t.seed, epoch)
        sums: dict[str, torch.Tensor] = {}
        bar = _progress_bar(steps_per_epoch, epoch, t.epochs) if progress else None
        batches = contextlib.closing(device_batches(images, _epoch_batches(order, t.batch_size, steps_per_epoch),
                                                    device, t.prefetch))
        with batches as epoch_batches:
            for i, batch in enumerate(epoch_batches):
                step = epoch * steps_per_epoch + i
                where = Progress(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch, epochs=t.epochs)
                lr = schedule.lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = method.training_loss(batch, augment, where)
                loss = out["loss"]
                if (i + 1) % check_every == 0 or i == steps_per_epoch - 1:
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise DivergenceError(
                            f"{config.method}: the loss became {value} at epoch {epoch + 1}, step {step + 1} "
                            f"(lr {lr:.3g}); lower optim.lr or raise optim.clip_grad_norm",
                            epoch=epoch + 1, step=step + 1, loss=value)
                    if bar is not None:
                        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.3g}")
                optimizer_step(method, optimizer, loss, where, config.optim.clip_grad_norm)
                schedule.step = step + 1
                for key, value in out.items():
                    v = value.detach().float()
                    sums[key] = sums[key] + v if key in sums else v
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - epoch_start
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch}
        metrics["ssl_loss"] = float(sums["loss"]) / steps_per_epoch
        for key, total in sums.items():
            if key != "loss":
                metrics[key] = float(total) / steps_per_epoch
        metrics.update(monitor(method.backbone))
        if not math.isfinite(metrics["feature_std"]):
            # the epoch's last update can leave non-finite weights before any loss shows it
            raise DivergenceError(
                f"{config.method}: the backbone's features became non-finite after epoch {epoch + 1} (lr {lr:.3g}); "
                "lower optim.lr or raise optim.clip_grad_norm", epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch,
                loss=metrics["ssl_loss"])
        metrics["images_per_s"] = steps_per_epoch * t.batch_size / train_seconds
        metrics["lr"] = lr
        done = epoch + 1
        due = done % t.checkpoint_every == 0 or done == t.epochs or done in t.checkpoint_epochs
        # A wsd run with rungs (a sweep's trial) judges at its rungs and last epoch only: its other
        # checkpoints are for resuming, and a cooldown branch at each would cost many epochs.
        judge_due = due and (config.optim.schedule != "wsd" or not t.checkpoint_epochs
                             or done in t.checkpoint_epochs or done == t.epochs)
        judged = judge(done, where, metrics) if judge_due else None
        metrics["judged"] = judge_due
        metrics["seconds"] = time.perf_counter() - epoch_start
        with open(run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        history.append(metrics)
        if due:
            last_checkpoint = save(done, metrics, judged)
        # The callback sees the checkpoint of this epoch when one was written (a sweep trial turns
        # it into a Tune checkpoint and evaluates the backbone in it).
        answer = callback({**metrics, "checkpoint": str(last_checkpoint) if due else None}) \
            if callback is not None else None
        if answer == "stop":
            status = "stopped"
        elif t.time_limit_minutes and (time.perf_counter() - started) / 60 >= t.time_limit_minutes and done < t.epochs:
            status = "time_limit"
        if status != "completed" and not due:
            judged = judge(done, where, {})
            last_checkpoint = save(done, metrics, judged)
        if status != "completed":
            break
    trained = Backbone(backbone.arch, backbone.in_chans)
    state = judged if judged is not None else backbone.torchvision_state_dict()
    trained.trunk.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
    return PretrainResult(run_dir=run_dir, epochs_completed=done, status=status, checkpoint=last_checkpoint,
                          metrics=history, backbone=trained)


def _progress_bar(total: int, epoch: int, epochs: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, dynamic_ncols=True)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
