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
