"""Make a trial honour the resources Tune gave it."""

from __future__ import annotations

import torch
from ray import tune


def apply_trial_resources() -> None:
    """Threads = the trial's CPU share (at least 1); on a GPU share, cap this process's memory to it.

    Ray only schedules fractional GPUs; it does not stop a trial from taking the whole card, so the
    trial caps itself (``torch.cuda.set_per_process_memory_fraction``).
    """
    resources = tune.get_context().get_trial_resources()
    bundle = resources.required_resources if resources is not None else {}
    cpus = bundle.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    gpu = bundle.get("GPU", 0)
    if gpu and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(gpu)))
