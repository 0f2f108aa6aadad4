"""The few-shot sweep's packing: its flags, and the plan it runs with (:mod:`cxrtune.packing`).

``--pack auto`` (the default) measures one trial of each evaluator kind before Ray starts and
sizes the share per trial from it: on a driver that sees a GPU, the GPU share (``--gpu``
overrides it, and the measurement still warns when the given share is too small); on a CPU-only
driver, the CPU share by memory and cores (``--cpu`` overrides it). ``--pack off`` measures
nothing: ``--gpu`` as given (none by default) and ``--cpu`` (1 by default), as before packing was
measured. The plan is planned on the driver's machine: on a cluster (``--address``) of other
machines, give ``--gpu``/``--cpu`` for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cxrtune.packing import (
    DEFAULT_MAX_PER_GPU,
    Measurement,
    PackingPlan,
    available_cores,
    available_memory,
    cpu_share,
    given_plan,
    measure_from_files,
    measure_in_child,
    plan_cpu,
    plan_gpu,
)
from cxrtune.sweep.args import positive_int

#: what a sweep measures with: (kinds, archs, cache folder, episodes file, eval flat, device) -> Measurement
Measure = Callable[[Sequence[str], Sequence[str], str, str, Mapping[str, Any], str], Measurement]


def add_packing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pack", choices=("auto", "off"), default="auto",
                        help="auto (default): measure one trial of each evaluator (a dry run of seconds) and size "
                             "the share per trial from its peak memory (x1.25 margin): the GPU share when this "
                             "machine has a GPU (--gpu overrides it), else the CPU share by memory and cores "
                             "(--cpu overrides it); off: no measurement, --gpu as given and --cpu 1")
    parser.add_argument("--max-per-gpu", type=positive_int, default=DEFAULT_MAX_PER_GPU,
                        help=f"most trials packing puts on one GPU (default: {DEFAULT_MAX_PER_GPU})")


def _gpus() -> int:
    """GPUs the driver sees (0 without CUDA). ``torch.cuda.is_available`` and ``device_count``
    create no CUDA context."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_packing(args: argparse.Namespace, eval_flat: Mapping[str, Any], archs: Sequence[str],
                 evaluators: Sequence[str], cache_path: str | Path, episodes_path: str | Path, *,
                 measure: Measure | None = None, gpus: int | None = None, cores: int | None = None,
                 memory: int | None = None) -> PackingPlan:
    """The resources of each trial of a few-shot sweep. ``measure``, ``gpus``, ``cores`` and
    ``memory`` (available bytes) default to the real ones: a GPU measurement in a child process,
    a CPU one in this process; tests pass their own."""
    gpus = _gpus() if gpus is None else gpus
    cores = cores or getattr(args, "cpus", None) or available_cores()
    device = "cuda" if gpus else "cpu"  # what is measured on
    if getattr(args, "pack", "auto") == "off":
        return given_plan("cuda" if args.gpu else "cpu", args.cpu or 1.0, args.gpu, "--pack off")
    if not gpus and (args.gpu or args.cpu):  # the user's shares stand; nothing to measure them against
        return given_plan("cuda" if args.gpu else "cpu", args.cpu or 1.0, args.gpu, "--gpu" if args.gpu else "--cpu")
    if measure is None:
        measure = measure_in_child if gpus else measure_from_files
    measured = measure(list(evaluators), list(archs), str(cache_path), str(episodes_path), dict(eval_flat), device)
    if gpus:
        planned = plan_gpu(measured.peaks, measured.total_bytes, cores=cores, gpus=gpus,
                           max_per_device=args.max_per_gpu, measured_s=measured.seconds)
        if args.gpu:  # the cores split among the trials the given share packs
            cpu = args.cpu or cpu_share(cores, max(1, math.floor(1 / args.gpu + 1e-9)) * gpus)
            return given_plan("cuda", cpu, args.gpu, "--gpu", planned=planned)
        if args.cpu:
            return dataclasses.replace(planned, cpu=args.cpu,
                                       explanation=f"{planned.explanation}; --cpu {args.cpu:g} given")
        return planned
    total = memory if memory is not None else (measured.total_bytes or available_memory())
    return plan_cpu(measured.peaks, total, cores=cores, measured_s=measured.seconds)


def write_plan(plan: PackingPlan, path: str | Path) -> Path:
    """The plan as JSON, ``<sweep>/packing.json``: what the sweep ran with and why."""
    path = Path(path)
    payload = {**dataclasses.asdict(plan), "resources": plan.resources}
    path.write_text(json.dumps(payload, indent=1, sort_keys=True))
    return path
