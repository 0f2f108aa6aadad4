"""How fast a pretraining config trains here: seconds per optimiser step, measured.

:func:`step_seconds` builds the run exactly as :func:`cxrtune.engine.train.pretrain` does (method,
optimiser, batches through the prefetcher, augmentation on the device, bf16 autocast on CUDA), runs ``warmup`` steps untimed (the
allocator, cuDNN's autotuner, lazy inits), then times ``steps`` steps and returns the median. A
sweep's budget planner turns it into hours per epoch (:mod:`cxrtune.plan`).
"""

from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
import torch

from cxrtune.augment import BatchAugment
from cxrtune.device import resolve_device
from cxrtune.engine.config import PretrainConfig
from cxrtune.engine.prefetch import device_batches
from cxrtune.engine.train import build_optimizer, optimizer_step
from cxrtune.errors import DataError
from cxrtune.methods import Progress, build_method
from cxrtune.models.backbone import build_backbone


def step_seconds(config: PretrainConfig, images: np.ndarray, rows: np.ndarray, *, steps: int = 4,
                 warmup: int = 2) -> tuple[float, float]:
    """Median seconds of one training step of ``config`` on ``images[rows]`` (see the module
    docstring), and the seconds of the set-up and warmup steps beyond that many steps (what a run
    pays once before it trains at that rate)."""
    t = config.train
    begun = time.perf_counter()
    if len(rows) < t.batch_size:
        raise DataError(f"{len(rows)} training images are fewer than train.batch_size = {t.batch_size}")
    device = resolve_device(t.device, "train.device")
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    torch.manual_seed(t.seed)
    backbone = build_backbone(config.model.arch, config.model.init, config.model.weights, config.model.in_chans)
    method = build_method(config.method, backbone, config.method_config()).to(device)
    backbone.grad_checkpointing = t.grad_checkpointing
    optimizer = build_optimizer(method, config)
    for group in optimizer.param_groups:
        group["lr"] = config.optim.lr * 1e-3  # a measurement, not training: keep the weights sane
    augment = BatchAugment(config.augment, t.image_size, torch.Generator(device=device).manual_seed(t.seed))
    order = np.random.default_rng(t.seed).permutation(np.asarray(rows))
    per_epoch = len(rows) // t.batch_size
    times = []
    method.train()
    batch_rows = (order[(i % per_epoch) * t.batch_size:((i % per_epoch) + 1) * t.batch_size]
                  for i in range(warmup + steps))
    with contextlib.closing(device_batches(images, batch_rows, device, t.prefetch)) as batches:  # as the loop gets them
        for i in range(warmup + steps):
            where = Progress(epoch=0, step=i, steps_per_epoch=per_epoch, epochs=t.epochs)
            start = time.perf_counter()
            batch = next(batches)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = method.training_loss(batch, augment, where)["loss"]
            optimizer_step(method, optimizer, loss, where, config.optim.clip_grad_norm)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    per_step = statistics.median(times)
    return per_step, max(0.0, time.perf_counter() - begun - sum(times) - warmup * per_step)
