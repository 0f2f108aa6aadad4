"""The batch prefetcher: the same batches as the plain path, gathered ahead, stopped cleanly."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from cxrtune.engine import DivergenceError, pretrain
from cxrtune.engine.checkpoint import load_checkpoint
from cxrtune.engine.prefetch import Prefetcher, device_batches, fetch
from cxrtune.profiles import smoke
from tests._engine_fixtures import blob_images

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path) -> np.ndarray:
    """A memory-mapped uint8 cache on disk, as the image cache is."""
    images = blob_images(40, 24)
    path = tmp_path / "images.u8"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=images.shape)
    out[:] = images
    out.flush()
    return np.load(path, mmap_mode="r")


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cxrtune-prefetch" and t.is_alive()]


def _wait_no_prefetch_threads(seconds: float = 5.0) -> list[threading.Thread]:
    deadline = time.monotonic() + seconds
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return _prefetch_threads()


def test_batches_rows_and_order_are_those_of_the_plain_path(cache):
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(cache))[:8] for _ in range(9)]
    plain = [fetch(cache, rows, CPU) for rows in orders]
    for depth in (1, 2, 4):
        got = [batch.clone() for batch in device_batches(cache, orders, CPU, depth)]
        assert len(got) == len(plain)
        for a, b in zip(got, plain):
            assert a.dtype == torch.uint8 and torch.equal(a, b)
    assert _wait_no_prefetch_threads() == []


def test_batches_are_gathered_ahead_of_the_step_into_a_ring_of_reused_buffers(cache):
    orders = [np.arange(i, i + 8) for i in range(0, 32, 8)] * 3
    with Prefetcher(cache, orders, CPU, depth=2) as prefetcher:
        batches = iter(prefetcher)
        first = next(batches)
        # while the "step" runs, the thread fills the two free buffers of the ring, and no more
        deadline = time.monotonic() + 5
        while prefetcher._ready.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert prefetcher._ready.qsize() == 2
        pointers = {first.data_ptr()}
        for batch in batches:
            pointers.add(batch.data_ptr())
        assert len(pointers) == 3  # 12 batches through three buffers: nothing allocated per step


def test_an_unreadable_row_is_raised_in_the_training_thread_and_the_thread_stops(cache):
    batches = device_batches(cache, [np.arange(8), np.array([0, 400])], CPU, 2)
    assert torch.equal(next(batches), fetch(cache, np.arange(8), CPU))
    with pytest.raises(IndexError, match="row 400 is out of bounds"):
        next(batches)
    assert _wait_no_prefetch_threads() == []


def test_closing_early_stops_the_gathering_thread(cache):
    endless = (np.arange(8) for _ in iter(int, 1))
    batches = device_batches(cache, endless, CPU, 3)
    next(batches)
    batches.close()
    assert _wait_no_prefetch_threads() == []
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(cache, [], CPU, depth=0)


def _run(images, tmp_path, name: str, prefetch: int, **extra):
    config = smoke("moco").override({"train.epochs": 2, "train.batch_size": 8, "train.monitor_images": 8,
                                     "train.prefetch": prefetch, **extra})
    return pretrain(config, images, tmp_path / name)


def test_training_with_and_without_the_prefetcher_gives_the_same_weights(tmp_path):
    images = blob_images(16, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = _run(images, tmp_path, "plain", 0)
        ahead = _run(images, tmp_path, "ahead", 3)
        # a wsd run judges on cooldown branches: they draw their batches through the prefetcher too
        wsd_plain = _run(images, tmp_path, "wsd0", 0, **{"optim.schedule": "wsd", "train.checkpoint_every": 1})
        wsd_ahead = _run(images, tmp_path, "wsd2", 2, **{"optim.schedule": "wsd", "train.checkpoint_every": 1})
    finally:
        torch.set_num_threads(threads)
    for a, b in ((plain, ahead), (wsd_plain, wsd_ahead)):
        assert [m["ssl_loss"] for m in a.metrics] == [m["ssl_loss"] for m in b.metrics]
        sa, sb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
        for key in sa["backbone"]:
            assert torch.equal(sa["backbone"][key], sb["backbone"][key]), key
    assert [m.get("cooldown_loss") for m in wsd_plain.metrics] == [m.get("cooldown_loss") for m in wsd_ahead.metrics]
    assert all(m.get("cooldown_loss") is not None for m in wsd_ahead.metrics)
    assert _wait_no_prefetch_threads() == []


def test_a_diverging_run_leaves_no_gathering_thread_behind(tmp_path):
    config = smoke("barlow").override({"optim.lr": 1e12, "optim.warmup_epochs": 0, "train.epochs": 3,
                                       "train.prefetch": 2})
    with pytest.raises(DivergenceError):
        pretrain(config, blob_images(16, 40), tmp_path / "run")
    assert _wait_no_prefetch_threads() == []
