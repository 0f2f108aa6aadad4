"""Batches gathered ahead of the training step, so the device does not wait for the image cache.

Without it the training thread gathers each batch from the memory-mapped cache (a fancy-index copy
of ``batch_size`` rows), page-locks a fresh buffer and copies it to the GPU, while the GPU idles.
:class:`Prefetcher` moves that work off the step:

- a background thread gathers the next batches (rows sorted, so memmap reads run forward) into a
  ring of ``depth + 1`` reusable host buffers, page-locked once on CUDA;
- on CUDA the host-to-device copy is issued on a side stream when the step asks for the batch;
  the host does not wait for it: the training stream waits on an event recorded after the copy
  (``wait_event``), and since the host runs ahead of the GPU the copy overlaps the previous step's
  kernels. A host buffer goes back to the ring only when its copy has finished (the gathering
  thread waits on the copy's event before it overwrites the buffer);
- on the CPU there is nothing to copy: the ring and the thread remain, and the batch handed out is
  a view of its ring buffer, valid until the next batch is asked for (the step has finished with it
  by then, as the loop runs it).

The batches, their rows and their order are exactly those of the plain path (``fetch``): a run
with and without the prefetcher, or resumed from a checkpoint, trains on the same data.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Self

import numpy as np
import torch

_STOP = object()


def fetch(images: np.ndarray, batch_rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """One batch on the training thread (the path without a prefetcher): gather the sorted rows,
    then copy to the device through a freshly page-locked buffer on CUDA."""
    batch = torch.from_numpy(images[np.sort(batch_rows)])
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch


class Prefetcher:
    """Iterate over device batches of ``images[rows]`` for each ``rows`` of ``batches``.

    ``depth``: how many batches may be gathered ahead of the one in use (>= 1). Use as a context
    manager (or call :meth:`close`) so the gathering thread stops when training stops early; an
    exhausted prefetcher closes itself. An error in the gathering thread (a bad row, an unreadable
    cache) is raised in the training thread at the batch it concerns.
    """

    def __init__(self, images: np.ndarray, batches: Iterable[np.ndarray], device: torch.device,
                 depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.images = images
        self.device = device
        self.cuda = device.type == "cuda"
        self._batches = iter(batches)
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._buffers: list[np.ndarray] = []
        self._pinned: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = []
        for slot in range(depth + 1):
            self._free.put(slot)
            self._copied.append(None)
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._thread = threading.Thread(target=self._gather_loop, name="cxrtune-prefetch", daemon=True)
        self._thread.start()

    # -- the gathering thread ---------------------------------------------------------------------
    def _buffer(self, slot: int, n: int) -> np.ndarray:
        shape = (n,) + self.images.shape[1:]
        while len(self._buffers) <= slot:
            self._buffers.append(None)  # type: ignore[arg-type]
            self._pinned.append(None)  # type: ignore[arg-type]
        buffer = self._buffers[slot]
        if buffer is None or buffer.shape != shape:
            host = torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda)
            self._pinned[slot] = host
            buffer = self._buffers[slot] = host.numpy()
        return buffer

    def _gather_loop(self) -> None:
        try:
            for rows in self._batches:
                slot = self._next_free()
                if slot is None:
                    return
                event = self._copied[slot]
                if event is not None:
                    event.synchronize()  # its last copy to the device must be done before we overwrite it
                rows = np.sort(np.asarray(rows))
                if len(rows) and (rows[0] < 0 or rows[-1] >= len(self.images)):
                    bad = rows[0] if rows[0] < 0 else rows[-1]
                    raise IndexError(f"cache row {bad} is out of bounds for a cache of {len(self.images)} images")
                buffer = self._buffer(slot, len(rows))
                # mode="clip" (the rows are checked above): numpy buffers ``out`` in mode="raise"
                np.take(self.images, rows, axis=0, out=buffer, mode="clip")
                self._ready.put(slot)
            self._ready.put(_STOP)
        except Exception as exc:  # noqa: BLE001 - handed to the training thread and raised there
            self._ready.put(exc)

    def _next_free(self) -> int | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    # -- the training thread ----------------------------------------------------------------------
    def _take(self):
        item = self._ready.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            while True:
                slot = self._take()
                if slot is _STOP:
                    return
                host = self._pinned[slot]
                if not self.cuda:
                    yield host  # a view of the ring buffer: the step is done with it when it asks again
                    self._free.put(slot)
                    continue
                current = torch.cuda.current_stream(self.device)
                with torch.cuda.stream(self._stream):
                    batch = host.to(self.device, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(self._stream)
                current.wait_event(copied)     # the step's kernels start after the copy, the host goes on
                batch.record_stream(current)   # allocated on the side stream, used on the training stream
                self._copied[slot] = copied
                self._free.put(slot)           # the gathering thread waits on ``copied`` before reusing it
                yield batch
        finally:
            self.close()

    def close(self) -> None:
        """Stop the gathering thread (idempotent)."""
        self._stop.set()
        while True:  # unblock a thread waiting for a free slot
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def device_batches(images: np.ndarray, batches: Iterable[np.ndarray], device: torch.device,
                   depth: int) -> Iterator[torch.Tensor]:
    """The batches of ``batches`` on ``device``: through a :class:`Prefetcher` of ``depth``, or
    gathered on the calling thread when ``depth`` is 0."""
    if depth == 0:
        return (fetch(images, rows, device) for rows in batches)
    return iter(Prefetcher(images, batches, device, depth))
