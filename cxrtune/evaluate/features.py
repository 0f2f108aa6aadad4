"""Frozen backbone features over cache rows, computed once per backbone and kept on disk.

A probe sweep evaluates one backbone on thousands of episodes that share a few thousand images,
so features are extracted once and cached under ``<cache_root>/features/<key>.npy`` (+ ``.json``
describing it). The key is a hash of everything that determines the numbers:

* the backbone: the sha256 of the checkpoint file, or ``random-<arch>-<seed>``, or
  ``imagenet-<arch>-<sha256 of the weights file>``;
* the images: the image cache's identity (source fingerprint, size, fit, build id) or, for an
  in-memory array, the hash of its bytes;
* the preprocessing (crop fraction, input size, mean, std) and the extraction precision;
* the set of rows.

Files are written to a temporary name and renamed, so a crash never leaves a half-written entry;
an entry that cannot be read back whole (a truncated or foreign file, a description that does not
match) is extracted again and overwritten, never trusted. Extraction of one key holds a file lock
(:mod:`filelock`, ``<cache_root>/features-locks/<key>.lock``): trials that evaluate the same
backbone at once (a grid of evaluators packed on one card) extract it once; the others wait for
the lock and read the entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from cxrtune.config import Config, param
from cxrtune.data.cache import cache_root  # $CXRTUNE_CACHE or ~/.cache/cxrtune
from cxrtune.device import resolve_device
from cxrtune.errors import DataError
from cxrtune.evaluate.preprocess import PreprocessConfig, preprocess
from cxrtune.models.backbone import (
    ARCHS,
    Backbone,
    CheckpointError,
    build_backbone,
    load_backbone,
)

FEATURE_FORMAT = "cxrtune-features-v1"
#: seconds a trial waits for another's extraction of the same features before giving up
_LOCK_TIMEOUT_S = 24 * 3600


class FeatureError(DataError):
    """Extracted features are unusable (NaN or infinite values)."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------
# Which backbone
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BackboneSpec(Config):
    """A backbone to evaluate: a checkpoint path, ``imagenet`` or ``random`` of ``arch``."""

    init: str = param("random", doc="a cxrtune checkpoint path, 'imagenet' or 'random'")
    arch: str = param("resnet50", choices=tuple(ARCHS), doc="architecture for imagenet/random, and the one a checkpoint must hold")
    weights: str | None = param(None, doc="local torchvision weights file for init=imagenet")
    seed: int = param(0, doc="initialisation seed for init=random")
    in_chans: int = param(1, choices=(1, 3), doc="input channels (1: grey stem, 3: stock RGB stem)")

    def is_checkpoint(self) -> bool:
        return self.init not in ("random", "imagenet")

    def identity(self) -> str:
        """What the feature cache is keyed by: the content of the weights, not their path."""
        if self.init == "random":
            return f"random-{self.arch}-{self.seed}-c{self.in_chans}"
        if self.init == "imagenet":
            if self.weights is None:
                return f"imagenet-{self.arch}-torchvision-c{self.in_chans}"
            return f"imagenet-{self.arch}-{self._sha(self.weights)}-c{self.in_chans}"
        # the arch is part of the key so that asking for the wrong one fails (building) every time
        return f"checkpoint-{self._sha(self.init)}-{self.arch}"

    @staticmethod
    def _sha(path: str) -> str:
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return file_sha256(path)

    def label(self) -> str:
        """Short name for tables: the checkpoint's file stem, or imagenet/random-<arch>."""
        return Path(self.init).stem if self.is_checkpoint() else f"{self.init}-{self.arch}"

    def build(self) -> Backbone:
        if self.is_checkpoint():
            return load_backbone(self.init, arch=self.arch)
        try:
            return build_backbone(self.arch, self.init, weights=self.weights, in_chans=self.in_chans, seed=self.seed)
        except RuntimeError as exc:  # load_state_dict's size mismatches
            raise CheckpointError(
                f"weights file {self.weights} does not match {self.arch}: {str(exc).splitlines()[0]} "
                f"(is it the weights of another architecture?)"
            ) from exc


# -------------------------------------------------------------------------------------------
# Which images
# -------------------------------------------------------------------------------------------


def images_identity(images: Any) -> str:
    """Identity of an image cache (or an in-memory uint8 array) for the feature-cache key."""
    report = getattr(images, "report", None)
    if isinstance(report, dict) and "fingerprint" in report:
        return (f"cache-{report['fingerprint']}-s{report.get('size')}-{report.get('fit')}"
                f"-{report.get('build_id', '')}")
    array = getattr(images, "images", images)
    if isinstance(array, np.memmap) and array.filename:
        stat = os.stat(array.filename)
        return f"memmap-{os.path.abspath(array.filename)}-{array.shape}-{stat.st_size}-{stat.st_mtime_ns}"
    array = np.ascontiguousarray(array)
    return f"array-{array.shape}-{hashlib.sha256(array.tobytes()).hexdigest()}"


def image_array(images: Any) -> np.ndarray:
    """The (N, S, S) uint8 array of an ImageCache or of an array itself."""
    array = getattr(images, "images", images)
    if not hasattr(array, "shape") or len(array.shape) != 3 or array.shape[1] != array.shape[2]:
        raise DataError(f"images: expected an (N, S, S) uint8 array or an ImageCache, got {type(array).__name__} "
                        f"of shape {getattr(array, 'shape', None)}")
    if array.dtype != np.uint8:
        raise DataError(f"images: expected dtype uint8, got {array.dtype}")
    return array


# -------------------------------------------------------------------------------------------
# Extraction
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExtractConfig(Config):
    batch_size: int = param(128, low=1, doc="images per forward pass")
    device: str = param("auto", doc="torch device: auto, cpu, cuda, cuda:1")
    precision: str = param("fp32", choices=("fp32", "bf16"), doc="bf16 autocast on CUDA; fp32 everywhere else")




@torch.inference_mode()
def extract_features(backbone: Backbone, images: Any, rows: Sequence[int], preprocessing: PreprocessConfig | None = None,
                     config: ExtractConfig | None = None, what: str = "backbone") -> np.ndarray:
    """Pooled features (len(rows), feature_dim) float32 of ``images[rows]``, in the order given."""
    preprocessing = preprocessing or PreprocessConfig()
    config = config or ExtractConfig()
    array = image_array(images)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= array.shape[0]):
        raise DataError(f"rows: cache row {int(rows.max() if rows.max() >= array.shape[0] else rows.min())} is outside "
                        f"the image array of {array.shape[0]} images")
    device = resolve_device(config.device)
    was_training = backbone.training
    backbone.eval().to(device)
    in_chans = getattr(backbone, "in_chans", 1)
    out = np.empty((rows.size, backbone.feature_dim), dtype=np.float32)
    order = np.argsort(rows, kind="stable")  # read the memmap front to back
    autocast = config.precision == "bf16" and device.type == "cuda"
    try:
        for start in range(0, rows.size, config.batch_size):
            pick = order[start: start + config.batch_size]
            batch = torch.from_numpy(np.ascontiguousarray(array[rows[pick]])).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                feats = backbone(preprocess(batch, preprocessing, in_chans))
            out[pick] = feats.float().cpu().numpy()
    finally:
        backbone.train(was_training)
    check_finite(out, what)
    return out


def check_finite(features: np.ndarray, what: str) -> None:
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():
        raise FeatureError(
            f"features of {what}: {int((~finite).sum())} of {len(finite)} rows contain NaN or inf "
            "(diverged or corrupt weights); nothing was cached"
        )


# -------------------------------------------------------------------------------------------
# The on-disk cache
# -------------------------------------------------------------------------------------------


def feature_key(backbone_id: str, images_id: str, preprocessing: PreprocessConfig, precision: str,
                rows: np.ndarray) -> str:
    description = {
        "format": FEATURE_FORMAT,
        "backbone": backbone_id,
        "images": images_id,
        "preprocessing": preprocessing.to_dict(),
        "precision": precision,
        "rows": hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:40]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_features(spec: BackboneSpec, images: Any, rows: Sequence[int],
                    preprocessing: PreprocessConfig | None = None, config: ExtractConfig | None = None,
                    root: str | Path | None = None, backbone: Backbone | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features of the unique cache ``rows`` of ``images`` for ``spec``, from disk when present.

    Returns ``(unique sorted rows, features aligned with them, metadata)``; ``metadata["cached"]``
    says whether they were read from disk. ``backbone`` skips building the model from ``spec``
    (the caller already has it); the key still comes from ``spec``.
    """
    preprocessing = preprocessing or PreprocessConfig()
    config = config or ExtractConfig()
    unique = np.unique(np.asarray(rows, dtype=np.int64))
    key = feature_key(spec.identity(), images_identity(images), preprocessing, config.precision, unique)
    folder = Path(root).expanduser() if root is not None else cache_root()
    npy, meta_path = folder / "features" / f"{key}.npy", folder / "features" / f"{key}.json"
    found = _read_entry(npy, meta_path, key, unique.size)
    if found is not None:
        return (unique, *found)
    # One extraction per key at a time: a trial that finds the lock held waits, then reads what the
    # holder wrote (extraction takes seconds to minutes; a day-long wait means a stuck holder). Lock
    # files stay (removing a flock file races with its next taker), beside the entries, not among them.
    locks = folder / "features-locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{key}.lock"), timeout=_LOCK_TIMEOUT_S, is_singleton=False):
        found = _read_entry(npy, meta_path, key, unique.size)
        if found is not None:
            return (unique, *found)
        return unique, *_extract_entry(spec, images, unique, preprocessing, config, backbone, key, npy, meta_path)


def _read_entry(npy: Path, meta_path: Path, key: str, rows: int) -> tuple[np.ndarray, dict] | None:
    """The features and description of a cache entry, or None when it is missing or not whole (a
    partial, truncated or foreign file is never trusted: the caller extracts it again)."""
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        feats = np.load(npy, mmap_mode=None, allow_pickle=False)
        if meta.get("key") == key and feats.dtype == np.float32 and feats.shape == (rows, meta["dim"]):
            meta["cached"] = True
            return feats, meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError):
        pass  # unreadable entry: recompute and overwrite it
    return None


def _extract_entry(spec: BackboneSpec, images: Any, unique: np.ndarray, preprocessing: PreprocessConfig,
                   config: ExtractConfig, backbone: Backbone | None, key: str, npy: Path,
                   meta_path: Path) -> tuple[np.ndarray, dict]:
    model = backbone if backbone is not None else spec.build()
    feats = extract_features(model, images, unique, preprocessing, config, what=spec.label())
    meta = {
        "format": FEATURE_FORMAT,
        "key": key,
        "backbone": spec.to_dict(),
        "backbone_identity": spec.identity(),
        "images": images_identity(images),
        "preprocessing": preprocessing.to_dict(),
        "precision": config.precision,
        "rows": int(unique.size),
        "dim": int(feats.shape[1]),
    }
    def write_features(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.save would add ".npy" to a name
            np.save(handle, feats)

    _atomic_write(npy, write_features)
    _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    meta["cached"] = False
    return feats, meta
