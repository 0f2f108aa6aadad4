"""Small uint8 image sets for engine tests: structured enough for SSL to have something to learn."""

from __future__ import annotations

import numpy as np


def blob_images(n: int = 32, size: int = 40, seed: int = 0) -> np.ndarray:
    """Grey images with a few bright discs of random position and size on a smooth gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        img = 0.2 + 0.3 * (yy * rng.uniform(-1, 1) + xx * rng.uniform(-1, 1))
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
            img += 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
        out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


def near_identical_images(n: int = 64, size: int = 32, seed: int = 0, jitter: float = 2.0) -> np.ndarray:
    """One base image plus faint per-image noise: the homogeneous data on which MoCo collapses."""
    rng = np.random.default_rng(seed)
    base = blob_images(1, size, seed)[0].astype(np.float64)
    noise = rng.normal(0, jitter, (n, size, size))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def homogeneous_images(n: int = 64, size: int = 32, seed: int = 0, contrast: float = 0.08) -> np.ndarray:
    """Images that all look alike, as radiographs do: one shared layout, faint per-image blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.35 + 0.25 * np.exp(-(((yy - 0.5) / 0.35) ** 2 + ((xx - 0.5) / 0.25) ** 2))
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        img = base.copy()
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
            img += contrast * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
        out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


# -- a method at smoke size, for the per-method tests ----------------------------------------------
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Small ResNets train faster (and alike on every machine) on one thread; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def method_setup(name: str, **overrides):
    """(config, method, optimizer, 16 blob images) of ``name`` at smoke size, seeded."""
    from cxrtune.engine.train import build_optimizer
    from cxrtune.methods import build_method
    from cxrtune.models.backbone import build_backbone
    from cxrtune.profiles import smoke

    config = smoke(name).override(overrides)
    torch.manual_seed(0)
    method = build_method(name, build_backbone("resnet18"), config.method_config())
    return config, method, build_optimizer(method, config), torch.from_numpy(blob_images(16, 40))


def mean_loss(method, config, images, seeds=(97, 98, 99)) -> float:
    """Mean loss over fixed views (three seeds), so a comparison does not hinge on one draw."""
    from cxrtune.augment import BatchAugment
    from cxrtune.methods import Progress

    total = 0.0
    for seed in seeds:
        augment = BatchAugment(config.augment, config.train.image_size, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            total += float(method.training_loss(images, augment, Progress(0, 0, 1, 1))["loss"])
    return total / len(seeds)


def train_steps(method, config, optimizer, images, steps: int, epoch: int = 1, epochs: int = 2) -> None:
    """``steps`` optimiser steps on fixed-seed views, with the method's hooks as the engine calls them."""
    from cxrtune.augment import BatchAugment
    from cxrtune.engine.train import optimizer_step
    from cxrtune.methods import Progress

    augment = BatchAugment(config.augment, config.train.image_size, torch.Generator().manual_seed(0))
    for step in range(steps):
        where = Progress(epoch=epoch, step=step, steps_per_epoch=steps, epochs=epochs)
        optimizer_step(method, optimizer, method.training_loss(images, augment, where)["loss"], where)
