"""CPU workers for the probe: pieces of one job shared by forked processes or by threads.

The probe's Newton iterations are dozens of small ops with Python in between, which holds the
GIL, so threads gain little; on Linux the workers are forked processes that inherit the features
by copy-on-write and send back a few numbers per episode. Threads are the fallback elsewhere and
where other Python threads run. docs/performance.md has the measurements.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing
import os
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from cxrtune.errors import ConfigError, DataError

Work = Callable[[Iterable[int]], list]  # takes piece numbers until they run out; returns its results


def run_workers(work: Work, pieces: int, workers: int, parallel: str) -> list:
    """``work`` run by ``workers`` workers at once over one queue of the piece numbers
    ``0 .. pieces - 1`` (each taken by one worker, in order); their results concatenated.

    A worker slowed by the machine simply takes fewer pieces, so the workers finish together.
    ``parallel`` is ``ProbeConfig.parallel``: see :func:`use_processes`.
    """
    with PieceQueue(pieces) as queue:
        if workers <= 1:
            return work(queue)
        if use_processes(parallel):
            return _with_forked_workers(work, queue, workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="probe") as pool:  # ops release the GIL
            return [row for rows in pool.map(lambda _: work(queue), range(workers)) for row in rows]


# The job of the processes being forked. The children run their inherited copy, so the features
# reach them by copy-on-write instead of being pickled; the lock keeps concurrent calls apart.
_inherited_job: tuple[Work, PieceQueue] | None = None
_forking = threading.Lock()


def _run_inherited_job() -> list:
    work, queue = _inherited_job
    try:
        return work(queue)
    except BaseException as exc:
        exc.add_note(f"raised in probe worker process {os.getpid()}")  # the pool adds its traceback as the cause
        raise


def _with_forked_workers(work: Work, queue: PieceQueue, workers: int) -> list:
    """This process and ``workers - 1`` forked children run ``work`` on ``queue`` at once.

    The children inherit the caller's limits on torch's and BLAS's threads (``solver_threads``).
    An exception in a child is raised here, with the child's traceback as its cause.
    """
    global _inherited_job
    # The cyclic garbage collector writes to every object it visits: while a child shares this
    # process's pages, each such write copies a page. It stays off until the children are done.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("fork")) as pool:
            with _forking:
                _inherited_job = work, queue
                try:  # with the fork start method the first submit starts every child
                    children = [pool.submit(_run_inherited_job) for _ in range(workers - 1)]
                finally:
                    _inherited_job = None
            try:
                out = work(queue)
            except BaseException:
                for _ in queue:  # the children's work is moot: leave them no more pieces
                    pass
                raise
            try:
                for child in children:
                    out += child.result()
            except BrokenProcessPool as exc:
                raise DataError("a probe worker process ended without a result (killed, out of memory?); "
                                "ProbeConfig(parallel='threads') solves in this process instead") from exc
        return out
    finally:
        if collecting:
            gc.enable()


def use_processes(parallel: str) -> bool:
    """Whether the workers are forked processes. ``auto`` forks only on Linux and only from a process
    that runs no other Python thread (a Ray worker, a server): a fork copies just the calling
    thread, and a lock another thread holds at that moment would stay locked in the child."""
    can_fork = sys.platform.startswith("linux") and hasattr(os, "fork")
    if parallel == "processes" and not can_fork:
        raise ConfigError(f"ProbeConfig.parallel = 'processes' needs os.fork on Linux; this is {sys.platform}: "
                          "use 'threads' or 'auto'")
    return parallel == "processes" or (parallel == "auto" and can_fork and threading.active_count() == 1)


class PieceQueue:
    """The numbers ``0 .. n - 1``, each taken by exactly one of the workers that iterate over it,
    in order: threads, or processes forked while it is open (they inherit the pipe).

    A pipe holds the numbers as 4-byte records, written at once before any worker starts; a read
    of one record is atomic between processes and threads alike (Linux serialises reads of a
    pipe), and the end of the pipe ends every worker's iteration. A pool's own task queue would
    not do: this process works on the pieces too, instead of waiting for its children.
    """

    _RECORD = 4

    def __init__(self, n: int) -> None:
        payload = np.arange(n, dtype=np.int32).tobytes()
        if len(payload) > 65536:  # the pipe's capacity (Linux): written before any reader runs
            raise ConfigError(f"probe: {n} pieces of work are too many for one queue (at most 16384); "
                              "use fewer ProbeConfig.workers")
        self._read, write = os.pipe()
        try:
            while payload:
                payload = payload[os.write(write, payload):]
        except BaseException:
            os.close(self._read)
            raise
        finally:
            os.close(write)

    def __iter__(self) -> Iterator[int]:
        while True:
            record = os.read(self._read, self._RECORD)
            if not record:
                return
            yield int(np.frombuffer(record, dtype=np.int32)[0])

    def __enter__(self) -> PieceQueue:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._read)


@contextlib.contextmanager
def solver_threads(device: torch.device):
    """numpy's BLAS on one thread, and on the CPU torch too, for the duration.

    Intra-op threading costs more than it gains on the solver's small ops (one worker on 2 intra-op
    threads measured 2.6 s on the study's grid, 0.70 s on 1); the workers parallelise instead.
    """
    with _blas_controller().limit(limits=1, user_api="blas"):
        if device.type != "cpu":
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    """numpy's BLAS, found once (a search of the loaded libraries costs milliseconds; a limit then 30 us)."""
    return ThreadpoolController()
