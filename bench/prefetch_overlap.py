"""Does the batch prefetcher hide the input pipeline behind the step? Wall time per batch with and
without it, for a synthetic step that lasts as long as gathering (and copying) one batch.

The cache is a memory-mapped uint8 file on disk (the image cache's format), read warm from the page
cache. First the input time of one batch is measured on the training thread as the loop without a
prefetcher pays it (gather the sorted rows; on CUDA also page-lock and copy to the GPU). Then a
synthetic step is calibrated to last as long: on the CPU a single-threaded matrix product loop (so
the step holds one core and the gathering thread has the other), on CUDA a chain of GPU matrix
products (the host only launches them). Both loops run ``--batches`` batches:

- plain:      fetch the batch on the training thread, then step;
- prefetcher: ``cxrtune.engine.prefetch.Prefetcher`` (depth 2) gathers ahead, copies on a side stream.

With no overlap a batch costs input + step; with full overlap max(input, step): the ideal ratio is 2
when the two are equal. The input's share of step time is (wall - step) / wall for each loop.

    python bench/prefetch_overlap.py                      # CPU: 1 core steps, 1 core gathers
    python bench/prefetch_overlap.py --device cuda        # GPU: what bench/gpu_suite.py runs
    python bench/prefetch_overlap.py --tiny               # seconds, for the test suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxrtune.engine.prefetch import Prefetcher, fetch


def make_cache(folder: Path, count: int, side: int, seed: int = 0) -> np.ndarray:
    """A memory-mapped (count, side, side) uint8 file in ``folder``, read once so it is warm."""
    path = folder / "images.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, side, side))
    rng = np.random.default_rng(seed)
    for start in range(0, count, 256):
        stop = min(count, start + 256)
        out[start:stop] = rng.integers(0, 256, (stop - start, side, side), dtype=np.uint8)
    out.flush()
    del out
    images = np.load(path, mmap_mode="r")
    int(np.asarray(images[::max(1, count // 64)]).sum())  # touch it
    for start in range(0, count, 256):
        np.asarray(images[start:start + 256]).max()
    return images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _orders(count: int, batch: int, batches: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(count, batch, replace=False) for _ in range(batches)]


def input_seconds(images: np.ndarray, orders: list[np.ndarray], device: torch.device) -> float:
    """Median seconds to gather (and on CUDA copy) one batch on the training thread."""
    times = []
    for rows in orders:
        start = time.perf_counter()
        batch = fetch(images, rows, device)
        _sync(device)
        times.append(time.perf_counter() - start)
        del batch
    return statistics.median(times)


class SyntheticStep:
    """A step of about ``seconds``: ``repeats`` products of two n x n matrices on ``device``
    (it also reads the batch, so the batch must be ready before it ends)."""

    def __init__(self, seconds: float, device: torch.device, n: int = 384) -> None:
        self.device = device
        self.a = torch.randn(n, n, device=device)
        self.repeats = 1
        one = self._time(8) / 8
        self.repeats = max(1, round(seconds / one))

    def _time(self, repeats: int) -> float:
        keep, self.repeats = self.repeats, repeats
        batch = torch.zeros(4, 8, 8, dtype=torch.uint8, device=self.device)
        self(batch)
        _sync(self.device)
        start = time.perf_counter()
        self(batch)
        _sync(self.device)
        self.repeats = keep
        return time.perf_counter() - start

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = self.a
        for _ in range(self.repeats):
            x = torch.tanh(x @ self.a)
        return x.sum() + batch.view(-1)[:1].float().sum()

    def seconds(self) -> float:
        return statistics.median(self._time(self.repeats) for _ in range(3))


def run_loop(images, orders, device, step: SyntheticStep, prefetch: int) -> tuple[float, float]:
    """Wall seconds per batch of the loop (after one warm batch), and of that the seconds the
    training thread waited for its batch."""
    if prefetch:
        source = iter(Prefetcher(images, orders, device, depth=prefetch))
    else:
        source = (fetch(images, rows, device) for rows in orders)
    step(next(source))
    _sync(device)
    waited = 0.0
    count = 0
    start = time.perf_counter()
    while True:
        asked = time.perf_counter()
        batch = next(source, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        step(batch)
        count += 1
    _sync(device)
    return (time.perf_counter() - start) / count, waited / count


def measure(device: torch.device, count: int, side: int, batch: int, batches: int, depth: int = 2,
            rounds: int = 5, folder: Path | None = None) -> dict:
    """The comparison above, ``rounds`` times each way, interleaved; a dict of the medians (seconds
    per batch, their ratio, input shares)."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        images = make_cache(Path(tmp), count, side)
        orders = _orders(count, batch, batches + 1, seed=1)
        input_s = input_seconds(images, _orders(count, batch, 7, seed=2), device)
        step = SyntheticStep(input_s, device)
        step_s = step.seconds()
        plain_runs, ahead_runs = [], []
        for _ in range(rounds):  # interleaved, so drifts in the machine's speed hit both alike
            plain_runs.append(run_loop(images, orders, device, step, 0))
            ahead_runs.append(run_loop(images, orders, device, step, depth))
        plain, plain_wait = (statistics.median(x) for x in zip(*plain_runs))
        ahead, ahead_wait = (statistics.median(x) for x in zip(*ahead_runs))
        del images
    return {"device": str(device), "images": count, "side": side, "batch": batch, "batches": batches,
            "depth": depth, "rounds": rounds, "batch_mb": round(batch * side * side / 2**20, 1),
            "input_ms": round(1e3 * input_s, 2), "step_ms": round(1e3 * step_s, 2),
            "plain_ms_per_batch": round(1e3 * plain, 2), "prefetch_ms_per_batch": round(1e3 * ahead, 2),
            "plain_wait_ms": round(1e3 * plain_wait, 2), "prefetch_wait_ms": round(1e3 * ahead_wait, 2),
            "speedup": round(plain / ahead, 3), "ideal_speedup": round((input_s + step_s) / max(input_s, step_s), 3),
            "input_share_plain": round(max(0.0, plain - step_s) / plain, 3),
            "input_share_prefetch": round(max(0.0, ahead - step_s) / ahead, 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--images", type=int, default=4096, help="images in the cache")
    parser.add_argument("--side", type=int, default=256, help="cache side (256 for 224 px training)")
    parser.add_argument("--batch", type=int, default=384, help="the study's MoCo batch")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each loop, interleaved; medians reported")
    parser.add_argument("--tiny", action="store_true", help="512 images of 64 px, batch 64, 12 batches")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.side, args.batch, args.batches, args.rounds = 512, 64, 64, 12, 1
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # the step holds one core; the gathering thread gets the other
    try:
        result = measure(device, args.images, args.side, args.batch, args.batches, args.depth, args.rounds)
    finally:
        torch.set_num_threads(threads)
    print(f"{result['device']}: batch {args.batch} x {args.side}^2 uint8 ({result['batch_mb']} MB); "
          f"input {result['input_ms']} ms, step {result['step_ms']} ms per batch", flush=True)
    print(f"  plain      {result['plain_ms_per_batch']:8.2f} ms/batch, waiting {result['plain_wait_ms']:6.2f} ms "
          f"for the batch; input share {100 * result['input_share_plain']:.0f} %")
    print(f"  prefetcher {result['prefetch_ms_per_batch']:8.2f} ms/batch, waiting {result['prefetch_wait_ms']:6.2f} ms "
          f"for the batch; input share {100 * result['input_share_prefetch']:.0f} %")
    print(f"  ratio plain/prefetcher {result['speedup']:.2f} (ideal {result['ideal_speedup']:.2f})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
