"""Make a trial honour the resources Tune gave it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from ray import tune

from cxrtune.packing import over_cap_as_error


def apply_trial_resources() -> float:
    """Threads = the trial's CPU share (at least 1); on a GPU share, cap this process's memory to it.
    Returns the GPU share the memory was capped to (0.0 when none).

    Ray only schedules fractional GPUs; it does not stop a trial from taking the whole card, so the
    trial caps itself (``torch.cuda.set_per_process_memory_fraction``).
    """
    resources = tune.get_context().get_trial_resources()
    bundle = resources.required_resources if resources is not None else {}
    cpus = bundle.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    gpu = bundle.get("GPU", 0)
    if gpu and torch.cuda.is_available():
        share = min(1.0, float(gpu))
        torch.cuda.set_per_process_memory_fraction(share)
        return share
    return 0.0


@contextlib.contextmanager
def memory_cap(share: float, packing: Mapping[str, Any] | None, kind: str | None) -> Iterator[None]:
    """Under a GPU memory cap (``share`` > 0), a CUDA out-of-memory error ends the trial as
    ``errored`` with a message naming its share, the measured peak of its ``kind`` (from the sweep's
    ``packing`` plan, when it measured) and the flag to change; the other trials go on."""
    packing = dict(packing or {})
    capacity = int(packing.get("capacity_bytes") or 0)
    if share and not capacity and torch.cuda.is_available():
        capacity = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    with over_cap_as_error(share, capacity, packing.get("peaks"), kind, packing.get("margin") or 1.25):
        yield
