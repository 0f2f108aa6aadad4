"""Real PNG folders and a minimal file source for the image-cache tests.

Kept in its own module (not in a test file) so that decoding worker processes started with
'spawn', and the subprocesses of the kill/concurrency tests, can import the source class.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrtune.data.index import patient_split, validate_index
from cxrtune.data.sources.base import Source, register_source

TESTS_DIR = Path(__file__).resolve().parent
#: read_images calls os._exit(3) on this call number (1-based) when set: a build killed midway.
EXIT_ENV = "CXRTUNE_TEST_EXIT_ON_CALL"
#: read_images waits on its first call until this many processes have reached it (a barrier).
BARRIER_ENV = "CXRTUNE_TEST_BARRIER_DIR"
BARRIER_PARTIES = 2
#: read_images writes ``pid-<pid>`` into this folder, then hangs (up to 60 s): a stuck decoder.
HOLD_ENV = "CXRTUNE_TEST_HOLD_DIR"


def structured_image(rng: np.random.Generator, height: int, width: int, kind: str) -> np.ndarray:
    """A radiograph-like array (smooth gradient, a bright disc, noise) in the requested format."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = 0.5 * x / max(1, width - 1) + 0.3 * y / max(1, height - 1)
    cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width, 0.25 * min(height, width)
    base += 0.4 * (((y - cy) ** 2 + (x - cx) ** 2) < r**2)
    base += rng.normal(0.0, 0.05, size=base.shape)
    base = (base - base.min()) / (base.max() - base.min())
    if kind == "L":
        return np.rint(base * 255).astype(np.uint8)
    if kind == "I;16":
        # a narrow 12-bit window, as detectors produce: the min-max rule must stretch it
        return np.rint(900 + base * 2500).astype(np.uint16)
    grey = np.rint(base * 255).astype(np.uint8)
    rgb = np.stack([grey, np.roll(grey, 3, axis=1), 255 - grey], axis=-1)
    if kind == "RGB":
        return rgb
    if kind == "RGBA":
        alpha = rng.integers(0, 256, size=(height, width, 1), dtype=np.uint8)
        return np.concatenate([rgb, alpha], axis=-1)
    raise ValueError(kind)


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path, format="PNG")
    return path


def make_png_folder(folder: Path, n: int = 12, seed: int = 0, kinds=("L", "I;16", "RGB", "RGBA"),
                    shape: tuple[int, int] | None = None) -> list[Path]:
    """``n`` PNGs of mixed formats and (non-square) shapes, named img_000.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = shape if shape else (int(rng.integers(36, 60)), int(rng.integers(36, 60)))
        paths.append(write_png(folder / f"img_{i:03d}.png", structured_image(rng, h, w, kinds[i % len(kinds)])))
    return paths


@register_source
class PngFolderSource(Source):
    """Every ``*.png`` in ``root``, one patient per image, no labels."""

    name = "cache-test-pngs"

    def build_index(self) -> pd.DataFrame:
        paths = sorted(self.root.glob("*.png"))
        df = pd.DataFrame(
            {
                "image_id": [p.name for p in paths],
                "patient_id": [p.stem for p in paths],
                "labels": [["No Finding"] for _ in paths],
                "view": "PA",
                "split": [patient_split(p.stem) for p in paths],
                "path": [str(p) for p in paths],
            }
        )
        return validate_index(df, source=self.name)

    def read_images(self, rows, size, fit="crop"):
        _maybe_exit()
        _maybe_wait_at_barrier()
        _maybe_hold()
        return super().read_images(rows, size, fit)


_CALLS = {"n": 0}


def _maybe_exit() -> None:
    on_call = os.environ.get(EXIT_ENV)
    _CALLS["n"] += 1
    if on_call and _CALLS["n"] >= int(on_call):
        os._exit(3)  # no cleanup, no finally blocks: what SIGKILL or a power cut does


def _maybe_hold() -> None:
    folder = os.environ.get(HOLD_ENV)
    if folder:
        Path(folder, f"pid-{os.getpid()}").touch()
        time.sleep(60)


def _maybe_wait_at_barrier() -> None:
    folder = os.environ.get(BARRIER_ENV)
    if not folder or _CALLS.get("barrier_done"):
        return
    Path(folder, f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while len(list(Path(folder).glob("ready-*"))) < BARRIER_PARTIES and time.monotonic() < deadline:
        time.sleep(0.02)
    _CALLS["barrier_done"] = True


def child_view(cache) -> dict:
    """Run in a spawned process: what the unpickled cache maps and holds."""
    import hashlib

    images = cache.images
    return {
        "type": type(images).__name__,
        "filename": str(images.filename),
        "mode": images.mode,
        "writeable": bool(images.flags.writeable),
        "sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
        "first_id": str(cache.index["image_id"].iloc[0]),
    }
