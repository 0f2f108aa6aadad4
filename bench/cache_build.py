"""Image-cache build throughput: 1024 x 1024 8-bit PNGs to 256 px, 1 worker vs N workers.

Both sides run in this one process, on the same files (in the page cache after writing), each
build into a fresh cache folder. Builds alternate (1, N, 1, N, ...) and each side keeps its best
run, so load from other processes on the machine hits both sides alike and the printed ratio is
the parallel speed-up. Two rates per side: end to end (the whole ``build_cache`` call: index,
fingerprint, worker start-up, decoding, writing; what a user waits for) and the decoding phase
alone (what a long build converges to, once the ~1 s of worker start-up is amortised).

    python bench/cache_build.py            # 64 images, workers 1 and 2, best of 3
    python bench/cache_build.py --n 256 --workers 4 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrtune.data.cache import build_cache
from cxrtune.data.index import patient_split, validate_index
from cxrtune.data.sources.base import Source


class BenchPngSource(Source):
    """Every PNG in a folder, unlabelled: just enough of a source to build a cache from."""

    name = "bench-pngs"

    def build_index(self) -> pd.DataFrame:
        paths = sorted(self.root.glob("*.png"))
        return validate_index(
            pd.DataFrame(
                {
                    "image_id": [p.name for p in paths],
                    "patient_id": [p.stem for p in paths],
                    "labels": [[] for _ in paths],
                    "view": "PA",
                    "split": [patient_split(p.stem) for p in paths],
                    "path": [str(p) for p in paths],
                }
            ),
            source=self.name,
        )


def synthetic_radiograph(rng: np.random.Generator, side: int) -> np.ndarray:
    """Smooth body-like shading, two dark 'lungs', rib-like stripes and noise, as 8-bit.

    Structure matters: PNG (deflate) decodes a constant image far faster than a real one.
    """
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    img = 0.6 - 0.3 * ((x - 0.5) ** 2 + (y - 0.55) ** 2)
    for cx in (0.32, 0.68):
        lung = ((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
        img -= 0.25 * lung
    img += 0.05 * np.sin(y * rng.uniform(40, 60)) * (x > 0.15) * (x < 0.85)
    img += rng.normal(0, 0.03, size=img.shape).astype(np.float32)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def write_pngs(folder: Path, n: int, side: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(synthetic_radiograph(rng, side)).save(path)
        total += path.stat().st_size
    return total / n


def timed_build(source: Source, cache_dir: Path, size: int, workers: int) -> dict:
    start = time.perf_counter()
    cache = build_cache(source, size=size, workers=workers, cache_dir=cache_dir, progress=False)
    seconds = time.perf_counter() - start
    return {"cache": cache, "seconds": seconds, "rate": len(cache) / seconds, **cache.report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="number of synthetic PNGs (default 64)")
    parser.add_argument("--side", type=int, default=1024, help="side of the source PNGs (default 1024)")
    parser.add_argument("--size", type=int, default=256, help="cached side in pixels (default 256)")
    parser.add_argument("--workers", type=int, default=2, help="parallel worker count (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating builds per side (default 3)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cxrtune-bench-") as tmp:
        tmp = Path(tmp)
        pngs = tmp / "pngs"
        pngs.mkdir()
        mean_bytes = write_pngs(pngs, args.n, args.side)
        source = BenchPngSource(pngs)
        print(f"{args.n} synthetic {args.side}x{args.side} 8-bit PNGs ({mean_bytes / 1e6:.2f} MB each) "
              f"-> {args.size} px; {os.cpu_count()} CPU(s) visible; best of {args.repeats} alternating runs")

        load_before = os.getloadavg()[0]
        runs: dict[int, list[dict]] = {1: [], args.workers: []}
        for repeat in range(args.repeats):
            for workers in runs:
                runs[workers].append(timed_build(source, tmp / f"cache-{workers}-{repeat}", args.size, workers))
        load_after = os.getloadavg()[0]

        first = runs[1][0]["cache"].images
        same = all(np.array_equal(first, run["cache"].images) for side in runs.values() for run in side)
        best_total = {w: max(side, key=lambda r: r["rate"]) for w, side in runs.items()}
        best_decode = {w: max(side, key=lambda r: r["steady_images_per_second"]) for w, side in runs.items()}
        for workers in runs:
            total, decode = best_total[workers], best_decode[workers]
            print(f"workers={workers}: end to end {total['rate']:6.1f} images/s ({total['seconds']:.2f} s, "
                  f"worker start-up {total['startup_seconds']:.2f} s); decoding phase "
                  f"{decode['steady_images_per_second']:6.1f} images/s, {decode['cpu_ms_per_image']:.1f} CPU ms/image")
        serial_total, parallel_total = best_total[1]["rate"], best_total[args.workers]["rate"]
        serial_decode = best_decode[1]["steady_images_per_second"]
        parallel_decode = best_decode[args.workers]["steady_images_per_second"]
        cpu_rate = {w: 1000 * w / min(r["cpu_ms_per_image"] for r in side) for w, side in runs.items()}
        print("CPU-time bound (if the cores were free of other work): "
              + ", ".join(f"workers={w}: {rate:.0f} images/s" for w, rate in cpu_rate.items()))
        print(f"1-min load average before/after: {load_before:.2f} / {load_after:.2f} "
              "(other processes on these cores slow the parallel side most)")
        print(f"speed-up workers={args.workers} / workers=1: end to end {parallel_total / serial_total:.2f}x, "
              f"decoding phase {parallel_decode / serial_decode:.2f}x; identical bytes in all builds: {same}")
        print(f"README: cache build, {args.side} px 8-bit PNG -> {args.size} px: {parallel_decode:.0f} images/s "
              f"decoding on {args.workers} workers vs {serial_decode:.0f} on one "
              f"({parallel_decode / serial_decode:.2f}x); {args.n} images end to end {parallel_total:.0f} vs "
              f"{serial_total:.0f} images/s (worker start-up ~{best_total[args.workers]['startup_seconds']:.1f} s)")


if __name__ == "__main__":
    main()
