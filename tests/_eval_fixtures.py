"""Shared fixtures for the evaluator tests: a labelled index, real episodes, synthetic features."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from cxrtune.data.index import validate_index
from cxrtune.data.tasks import ShotsCappedWarning, build_task_pool, sample_episodes


def make_index(counts: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """One image per patient; counts = {label: (n_train, n_val)}."""
    rows = []
    for label, (n_train, n_val) in counts.items():
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                pid = f"{label}-{split}-{i}"
                rows.append({"image_id": f"{pid}.png", "patient_id": pid, "labels": [label],
                             "view": "PA", "split": split, "path": ""})
    return validate_index(pd.DataFrame(rows))


def make_episodes(n_diseases: int = 4, shots=(1, 5, 10), trials: int = 3, train_pos: int = 30,
                  val_pos: int = 8, normal: tuple[int, int] = (150, 60)):
    """An index with ``n_diseases`` rare labels plus 'normal', and the study's episodes on it."""
    counts = {f"disease{d}": (train_pos, val_pos) for d in range(n_diseases)}
    counts["normal"] = normal
    index = make_index(counts)
    pool = build_task_pool(index, exclude={"normal"}, min_train=1, min_val=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShotsCappedWarning)
        episodes = sample_episodes(pool, shots=shots, trials=trials)
    return index, episodes


def synthetic_features(index: pd.DataFrame, dim: int = 64, signal: float = 0.6, seed: int = 0,
                       nonnegative: bool = True) -> tuple[np.ndarray, dict[str, int]]:
    """Features like pooled ReLU activations: each label shifts a random direction by ``signal``."""
    rng = np.random.default_rng(seed)
    labels = sorted({l[0] for l in index["labels"]})
    directions = {l: rng.normal(size=dim) / np.sqrt(dim) for l in labels}
    base = rng.normal(size=dim)
    feats = np.stack([base + rng.normal(size=dim) + signal * np.sqrt(dim) * directions[l[0]]
                      for l in index["labels"]])
    if nonnegative:
        feats = np.maximum(feats, 0) + 1e-3
    row_of_id = {image_id: i for i, image_id in enumerate(index["image_id"])}
    return feats.astype(np.float32), row_of_id


def synthetic_images(index: pd.DataFrame, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 (N, size, size) noise images; each label adds a bright square at its own place."""
    rng = np.random.default_rng(seed)
    labels = sorted({l[0] for l in index["labels"]})
    images = rng.integers(0, 200, size=(len(index), size, size)).astype(np.int16)
    for row, l in enumerate(index["labels"]):
        k = labels.index(l[0])
        y, x = (k * 7) % (size - 10), (k * 11) % (size - 10)
        images[row, y: y + 8, x: x + 8] += 30  # faint: few-shot AUROCs well below 1
    images = images.clip(0, 255).astype(np.uint8)
    return images


class FakeCache:
    """The parts of cxrtune.data.cache.ImageCache the evaluators use, over an in-memory array."""

    def __init__(self, index: pd.DataFrame, images: np.ndarray) -> None:
        self.images = images
        self.index = index.assign(cache_row=np.arange(len(index)))
        self.size = images.shape[1]
        self.report = {"fingerprint": "fake", "size": self.size, "fit": "crop", "build_id": str(hash(images.tobytes()))}
