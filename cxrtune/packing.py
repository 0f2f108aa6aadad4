"""How many small trials share one device: a plan from measured memory, not a hand-picked share.

A few-shot sweep runs many small trials (a probe grid on cached features, a short finetune). Ray
packs them with fractional resources (``{"gpu": 0.25}`` runs four on one GPU) but the fractions
are logical only: Ray schedules by them and caps nothing. So the sweep measures what one trial of
each kind really takes, in a short dry run (:func:`measure_trial_peaks`), and plans from that:

* on a GPU (:func:`plan_gpu`), each trial needs its measured peak of the CUDA caching allocator
  times :data:`SAFETY_MARGIN`, plus :data:`CUDA_CONTEXT_BYTES` for the CUDA context that every
  trial process creates outside the allocator; the card holds ``floor(total / need)`` of them, at
  most ``max_per_device``, and each gets ``1 / trials`` of the card (the largest share that packs
  that many: every trial's memory cap, ``share x total``, then holds its need with room to spare);
* on a CPU (:func:`plan_cpu`), each trial process needs its measured peak RSS growth times the
  margin plus :data:`WORKER_BASE_BYTES` (a Ray worker with torch imported, before it does
  anything), the machine's available memory holds ``floor(available / need)`` of them, and no
  more run than there are cores (the trials are compute-bound: a second trial on a core only
  halves the speed of the first); each gets ``cores / trials`` cores.

When the kinds of a sweep mix (probe and finetune trials), every trial gets the share of the
largest kind: Ray gives all trials of a sweep one resource request.

The planner is pure (numbers in, a :class:`PackingPlan` out) so that it is tested without a GPU;
:func:`measure_trial_peaks` is the measurement it is given in a sweep (a test passes its own).
Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from cxrtune.errors import ConfigError, CxrtuneError

MIB = 1024 ** 2
GIB = 1024 ** 3
#: Measured peaks are multiplied by this. One dry run sees one batch order and one episode of
#: each size; other episodes (more test images, another training size) and allocator
#: fragmentation over a long trial take more. 25 % covers what we saw between the dry run and a
#: whole trial, and is the usual headroom of GPU packing advice (one quarter of the card kept free).
SAFETY_MARGIN = 1.25
#: Added to each GPU trial's need: the CUDA context (kernels, cuBLAS/cuDNN handles) of the trial's
#: process lives outside the caching allocator, so neither the measured peak nor the trial's
#: memory cap (``torch.cuda.set_per_process_memory_fraction``) counts it. It is about 300-500 MiB
#: on recent cards and CUDA 12; we take the top of that range.
CUDA_CONTEXT_BYTES = 500 * MIB
#: Added to each CPU trial's need: the resident memory of a Ray worker process with Ray Tune, torch
#: and cxrtune imported, before the trial allocates anything, which the dry run's RSS growth does
#: not include. Measured on Linux (Ray 2.60, torch 2.14): 0.86 GiB for a Python that imported
#: them; few-shot trial workers of ``bench/gpu_packing.py --tiny`` peaked at 0.90-0.98 GiB in all.
WORKER_BASE_BYTES = 1024 * MIB
#: Default for the most trials on one GPU: past 8 small trials the card's compute, not its memory,
#: is the limit, and each trial still holds its own CUDA context and CPU worker.
DEFAULT_MAX_PER_GPU = 8
#: Ray keeps resource amounts to 4 decimals; shares are rounded down to them.
_RAY_PRECISION = 10_000


def gib(n: float) -> str:
    """Bytes as GiB for messages: ``'0.61 GiB'``."""
    return f"{n / GIB:.2f} GiB"


# -------------------------------------------------------------------------------------------
# The plan
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackingPlan:
    """Shares per trial and what they come from.

    ``device`` is ``"cuda"`` or ``"cpu"``; ``gpu`` the GPU fraction per trial (None on CPU);
    ``cpu`` the cores per trial; ``per_device`` trials per GPU (or per machine on CPU);
    ``peaks`` the measured peak bytes per trial kind (empty when nothing was measured);
    ``kind`` the kind whose need sets the share; ``need_bytes`` its peak x ``margin`` +
    ``headroom_bytes``; ``capacity_bytes`` the GPU's total memory (or the machine's available
    memory on CPU); ``limited_by`` what capped ``per_device`` (``memory``, ``--max-per-gpu``,
    ``cores``, or ``--gpu``/``--cpu``/``--pack off`` when the user's share stands); ``explanation``
    the one line the sweep prints.
    """

    device: str
    cpu: float
    gpu: float | None
    per_device: int
    peaks: Mapping[str, int]
    kind: str
    need_bytes: int
    margin: float
    headroom_bytes: int
    capacity_bytes: int
    limited_by: str
    explanation: str
    measured_s: float = 0.0

    @property
    def resources(self) -> dict[str, float]:
        """The resource request of every trial, as ``SweepSpec.resources`` takes it."""
        out = {"cpu": float(self.cpu)}
        if self.gpu:
            out["gpu"] = float(self.gpu)
        return out

    @property
    def peak_bytes(self) -> int:
        return int(self.peaks.get(self.kind, 0)) if self.peaks else 0

    def line(self) -> str:
        return f"packing: {self.explanation}"

    def mlflow_params(self) -> dict[str, Any]:
        """Params of the sweep's parent run (MLflow names: letters, digits, ``_ - . /``)."""
        params: dict[str, Any] = {"packing.device": self.device, "packing.cpu_per_trial": self.cpu,
                                  "packing.trials_per_device": self.per_device, "packing.limited_by": self.limited_by}
        if self.gpu is not None:
            params["packing.gpu_per_trial"] = self.gpu
        if self.peaks:
            params["packing.margin"] = self.margin
            params["packing.headroom_mib"] = round(self.headroom_bytes / MIB, 1)
            params["packing.capacity_gib"] = round(self.capacity_bytes / GIB, 3)
            params["packing.sizing_kind"] = self.kind
            for kind, peak in sorted(self.peaks.items()):
                params[f"packing.peak_mib.{kind}"] = round(peak / MIB, 1)
        return params

    def trial_info(self) -> dict[str, Any]:
        """What a trial needs to explain its own out-of-memory error (:func:`over_cap_as_error`)."""
        return {"device": self.device, "gpu": self.gpu, "capacity_bytes": self.capacity_bytes,
                "peaks": dict(self.peaks), "margin": self.margin}


def _check_peaks(peaks: Mapping[str, float], what: str) -> dict[str, int]:
    if not peaks:
        raise ConfigError(f"{what}: no trial kind was measured (peaks = {{}}); measure at least one kind, "
                          "e.g. {'probe': bytes}")
    out = {}
    for kind, value in peaks.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{what}: measured peak of {kind!r} trials = {value!r}: use a finite number of "
                              "bytes > 0 (a dry run that allocated nothing measured nothing)")
        out[str(kind)] = int(value)
    return out


def _check_common(capacity: float, margin: float, headroom: float, what: str, capacity_name: str) -> None:
    if not isinstance(capacity, (int, float)) or not math.isfinite(capacity) or capacity <= 0:
        raise ConfigError(f"{what}: {capacity_name} = {capacity!r}: use a number of bytes > 0")
    if not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 1:
        raise ConfigError(f"{what}: margin = {margin!r}: use a number >= 1 (1.25 keeps a quarter spare)")
    if not isinstance(headroom, (int, float)) or headroom < 0:
        raise ConfigError(f"{what}: headroom = {headroom!r}: use a number of bytes >= 0")


def _check_count(value: Any, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}: {name} = {value!r}: use an integer >= 1")
    return value


def round_share(share: float) -> float:
    """A share Ray accepts: rounded down to Ray's 4 decimals, at least 0.0001, at most 1."""
    return max(1 / _RAY_PRECISION, min(1.0, math.floor(share * _RAY_PRECISION + 1e-9) / _RAY_PRECISION))


def cpu_share(cores: int, trials: int) -> float:
    """Cores per trial when ``trials`` share ``cores``: a whole number when it is 1 or more (Ray
    refuses fractions above 1), else a fraction of one core."""
    per = cores / trials
    return float(math.floor(per)) if per >= 1 else round_share(per)


def plan_gpu(peaks: Mapping[str, float], total_bytes: float, *, cores: int, gpus: int = 1,
             margin: float = SAFETY_MARGIN, headroom: float = CUDA_CONTEXT_BYTES,
             max_per_device: int = DEFAULT_MAX_PER_GPU, measured_s: float = 0.0) -> PackingPlan:
    """The GPU share per trial from the measured ``peaks`` (bytes per trial kind) on a card of
    ``total_bytes``; ``cores`` CPUs are split among the ``per_device x gpus`` trials that run at once.

    Refuses (:class:`ConfigError`) a trial kind whose need is more than the card holds, naming the
    kind, the numbers and the setting to lower.
    """
    what = "GPU packing"
    peaks = _check_peaks(peaks, what)
    _check_common(total_bytes, margin, headroom, what, "the GPU's total memory")
    _check_count(cores, "cores", what)
    _check_count(gpus, "gpus", what)
    _check_count(max_per_device, "--max-per-gpu", what)
    kind = max(peaks, key=lambda k: (peaks[k], k))
    need = int(peaks[kind] * margin + headroom)
    if need > total_bytes:
        raise ConfigError(
            f"one {kind} trial needs {gib(peaks[kind])} measured x {margin:g} margin + {gib(headroom)} CUDA context "
            f"= {gib(need)}, more than this GPU's {gib(total_bytes)}: lower eval.batch_size (--set "
            "eval.batch_size=N; finetuning: eval.finetune.batch_size) or eval.input_size")
    by_memory = int(total_bytes // need)
    per_device = min(by_memory, max_per_device)
    limited_by = "memory" if by_memory <= max_per_device else "--max-per-gpu"
    share = round_share(1.0 / per_device)
    while per_device > 1 and share * total_bytes < need:  # rounding down may not leave the need
        per_device -= 1
        share = round_share(1.0 / per_device)
    cpu = cpu_share(cores, per_device * gpus)
    cap = f"capped by --max-per-gpu {max_per_device}" if limited_by == "--max-per-gpu" else "by memory"
    explanation = (f"{kind} trials need {gib(peaks[kind])} measured (x{margin:g} margin + {gib(headroom)} CUDA "
                   f"context = {gib(need)}) -> {share:g} GPU each, {per_device} per GPU of {gib(total_bytes)} "
                   f"({cap}), {cpu:g} CPU each")
    return PackingPlan("cuda", cpu, share, per_device, peaks, kind, need, margin, int(headroom), int(total_bytes),
                       limited_by, explanation, measured_s)


def plan_cpu(peaks: Mapping[str, float], available_bytes: float, *, cores: int, margin: float = SAFETY_MARGIN,
             headroom: float = WORKER_BASE_BYTES, max_per_device: int | None = None,
             measured_s: float = 0.0) -> PackingPlan:
    """The CPU share per trial from the measured ``peaks`` (peak RSS growth per trial kind, bytes),
    the machine's ``available_bytes`` of memory and its ``cores``: as many trials as memory holds,
    no more than the cores (or ``max_per_device``), each with ``cores / trials`` cores."""
    what = "CPU packing"
    peaks = _check_peaks(peaks, what)
    _check_common(available_bytes, margin, headroom, what, "the machine's available memory")
    _check_count(cores, "cores", what)
    if max_per_device is not None:
        _check_count(max_per_device, "max_per_device", what)
    kind = max(peaks, key=lambda k: (peaks[k], k))
    need = int(peaks[kind] * margin + headroom)
    if need > available_bytes:
        raise ConfigError(
            f"one {kind} trial needs {gib(peaks[kind])} measured x {margin:g} margin + {gib(headroom)} worker "
            f"process = {gib(need)}, more than this machine's {gib(available_bytes)} of available memory: lower "
            "eval.batch_size (--set eval.batch_size=N) or eval.input_size, or free memory")
    by_memory = int(available_bytes // need)
    limits = {"memory": by_memory, "cores": cores}
    if max_per_device is not None:
        limits["max_per_device"] = max_per_device
    limited_by = min(limits, key=lambda k: (limits[k], k != "cores"))
    per_device = limits[limited_by]
    cpu = cpu_share(cores, per_device)
    explanation = (f"{kind} trials need {gib(peaks[kind])} measured (x{margin:g} margin + {gib(headroom)} worker "
                   f"process = {gib(need)}) -> {cpu:g} CPU each, {per_device} at once on {cores} cores and "
                   f"{gib(available_bytes)} available (limited by {limited_by})")
    return PackingPlan("cpu", cpu, None, per_device, peaks, kind, need, margin, int(headroom), int(available_bytes),
                       limited_by, explanation, measured_s)


def given_plan(device: str, cpu: float, gpu: float | None, flag: str, *, planned: PackingPlan | None = None,
               capacity_bytes: int = 0) -> PackingPlan:
    """The shares the user gave (``flag``: ``--gpu``, ``--cpu`` or ``--pack off``), with what
    packing would have planned, when it measured, and a warning when the given GPU share leaves a
    trial less memory than it was measured to need."""
    per_device = max(1, math.floor(1 / gpu + 1e-9)) if gpu else (planned.per_device if planned else 1)
    if planned is None:
        text = f"{flag} given: " + (f"{gpu:g} GPU each ({per_device} per GPU), " if gpu else "") + f"{cpu:g} CPU each"
        return PackingPlan(device, cpu, gpu, per_device, {}, "", 0, SAFETY_MARGIN, 0, capacity_bytes, flag, text)
    planned_share = f"{planned.gpu:g} GPU" if planned.gpu is not None else f"{planned.cpu:g} CPU"
    text = (f"{flag} given: " + (f"{gpu:g} GPU each ({per_device} per GPU), " if gpu else "") + f"{cpu:g} CPU each; "
            f"measured: {planned.explanation.split(' -> ')[0]} -> would plan {planned_share} each")
    if gpu and planned.device == "cuda" and gpu * planned.capacity_bytes < planned.need_bytes:
        text += (f". WARNING: {gpu:g} x {gib(planned.capacity_bytes)} = {gib(gpu * planned.capacity_bytes)} is less "
                 f"than the {gib(planned.need_bytes)} one {planned.kind} trial needs: such trials may end errored "
                 "out of memory")
    return dataclasses.replace(planned, cpu=cpu, gpu=gpu, per_device=per_device, limited_by=flag, explanation=text)


# -------------------------------------------------------------------------------------------
# A trial over its cap
# -------------------------------------------------------------------------------------------


class MemoryCapError(CxrtuneError):
    """A trial ran out of memory under the cap its GPU share sets."""


def oom_types() -> tuple[type[BaseException], ...]:
    """The exception types of a CUDA out-of-memory error in the installed torch (constructible on
    a CPU build too, which is how the tests raise them)."""
    import torch

    types = [getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple(dict.fromkeys(t for t in types if t is not None))


def memory_cap_message(share: float, capacity_bytes: int, peaks: Mapping[str, float] | None, kind: str | None,
                       margin: float = SAFETY_MARGIN, error: BaseException | None = None) -> str:
    """What an over-cap trial says: its share (fraction and GiB), the measured peak of its kind (or
    of the sweep's largest kind) when known, and the flag to change."""
    cap = share * capacity_bytes
    text = f"this trial ran out of GPU memory under its cap: --gpu share {share:g}"
    text += f" = {gib(cap)} of the card's {gib(capacity_bytes)}" if capacity_bytes else " of the card"
    peaks = dict(peaks or {})
    key = kind if kind in peaks else (max(peaks, key=peaks.get) if peaks else None)
    if key is not None:
        need = peaks[key] * margin + CUDA_CONTEXT_BYTES
        text += (f"; a {key} trial was measured at {gib(peaks[key])} before the sweep (x{margin:g} margin + "
                 f"{gib(CUDA_CONTEXT_BYTES)} CUDA context = {gib(need)}")
        text += f", share >= {min(1.0, need / capacity_bytes):.4f})" if capacity_bytes else ")"
    else:
        text += "; no measured peak is known (the share was given with --gpu)"
    text += ". Raise --gpu (fewer trials per GPU), or leave --gpu out so that packing sizes the share from a " \
            "measurement, or lower eval.batch_size"
    if error is not None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        text += f". torch said: {first}"
    return text


@contextlib.contextmanager
def over_cap_as_error(share: float | None, capacity_bytes: int = 0, peaks: Mapping[str, float] | None = None,
                      kind: str | None = None, margin: float = SAFETY_MARGIN,
                      errors: tuple[type[BaseException], ...] | None = None) -> Iterator[None]:
    """Turn an out-of-memory error of a trial that runs under a GPU memory cap (``share`` > 0) into a
    :class:`MemoryCapError` that names the share, the measured peak and the flag. ``errors`` are
    the exception types taken for out-of-memory (default: torch's CUDA OOM, and the RuntimeErrors
    cuBLAS and cuDNN raise when their workspace allocation fails). Without a share the error
    passes through unchanged."""
    caught = errors if errors is not None else oom_types()
    try:
        yield
    except Exception as err:
        if share and (isinstance(err, caught) or (errors is None and _says_out_of_memory(err))):
            raise MemoryCapError(memory_cap_message(share, capacity_bytes, peaks, kind, margin, err)) from err
        raise


#: what cuBLAS and cuDNN say (as a plain RuntimeError) when their workspace cannot be allocated
_ALLOC_FAILED = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def _says_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _ALLOC_FAILED)


# -------------------------------------------------------------------------------------------
# The dry run
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
    """Peak memory of one trial of each kind: ``peaks`` (kind -> bytes, the largest over the
    architectures), ``by_arch`` (arch -> kind -> bytes), the ``device`` type measured on, the
    device's ``total_bytes`` (GPU memory; on CPU the available memory), and seconds taken."""

    peaks: dict[str, int]
    by_arch: dict[str, dict[str, int]]
    device: str
    total_bytes: int
    seconds: float


def available_memory() -> int:
    """Bytes of memory available to new processes: ``MemAvailable`` of /proc/meminfo (free memory
    plus what the kernel can reclaim), or the physical memory where that file is missing."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(usage if sys.platform == "darwin" else usage * 1024)


def _return_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``) where that exists."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def rss_peak(interval_s: float = 0.005) -> Iterator[dict[str, int]]:
    """Peak growth of this process's resident memory over the block, in ``result["peak"]``.

    A thread samples the RSS (/proc/self/statm) every ``interval_s``; the process's lifetime
    high-water mark (``ru_maxrss``) cannot be reset and is already high in a driver that has built
    caches, so it is used only where /proc is missing (then growth above that mark is all it
    sees)."""
    result = {"peak": 0}
    _return_free_memory()  # else memory freed by an earlier kind is reused unseen
    start = _rss_bytes()
    if start is None:
        before = _maxrss_bytes()
        yield result
        result["peak"] = max(0, _maxrss_bytes() - before)
        return
    highest = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = _rss_bytes()
            if now is not None and now > highest[0]:
                highest[0] = now
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, name="cxrtune-rss-peak", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        end = _rss_bytes()
        result["peak"] = max(0, max(highest[0], end or 0) - start)


@contextlib.contextmanager
def cuda_peak(device) -> Iterator[dict[str, int]]:
    """Peak bytes the CUDA caching allocator reserved over the block (``result["peak"]``; what the
    per-process memory fraction caps) and allocated (``result["allocated"]``), above what it held
    before."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    reserved0, allocated0 = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    result = {"peak": 0, "allocated": 0}
    try:
        yield result
    finally:
        torch.cuda.synchronize(device)
        result["peak"] = max(0, torch.cuda.max_memory_reserved(device) - reserved0)
        result["allocated"] = max(0, torch.cuda.max_memory_allocated(device) - allocated0)


def _largest_episodes(episodes, count: int):
    """The ``count`` episodes with the most training images (first by order): the dry run's subset."""
    sizes = episodes["train_ids"].map(len)
    return episodes.loc[sizes.sort_values(ascending=False, kind="stable").index[:count]]


def measure_trial_peaks(kinds: Sequence[str], archs: Sequence[str], images: Any, episodes, config: Any,
                        device: str = "auto", probe_episodes: int = 4) -> Measurement:
    """A short dry run of one trial of each evaluator kind in ``kinds`` (``probe``, ``knn``,
    ``finetune``) for each architecture in ``archs``, on the sweep's ``images`` (an ImageCache),
    ``episodes`` and evaluation ``config`` (:class:`cxrtune.evaluate.run.EvalConfig`).

    What runs, at the sweep's input size and batch sizes (a random-init backbone of the arch: the
    weights do not change the memory):

    * ``probe`` / ``knn``: feature extraction of two batches of ``config.batch_size`` images, then
      the evaluator on random features of the backbone's width for every image of the episodes
      (the probe on the ``probe_episodes`` largest episodes only: its solver works a bounded chunk
      of problems at a time, so a few episodes of the largest size reach its peak; kNN on all of
      them, since it scores all episodes of one size at once);
    * ``finetune``: one epoch of finetuning on the episode with the most training images (its
      batches, backward pass and AdamW state) and scoring its test set.

    The peak is the CUDA caching allocator's reserved memory on a GPU (what a trial's memory cap
    limits), the process's RSS growth on a CPU. The probe runs with one worker, as in a trial with
    one core. Returns a :class:`Measurement`; ``peaks`` holds each kind's largest over the archs.
    """
    import numpy as np
    import torch

    from cxrtune.device import resolve_device
    from cxrtune.evaluate.episodes import episode_arrays
    from cxrtune.evaluate.features import BackboneSpec, extract_features, image_array
    from cxrtune.evaluate.finetune import finetune_episode
    from cxrtune.evaluate.knn import knn_scores
    from cxrtune.evaluate.probe import fit_probes
    from cxrtune.evaluate.run import EVALUATORS, default_row_map

    unknown = [k for k in kinds if k not in EVALUATORS]
    if unknown or not kinds:
        raise ConfigError(f"measure_trial_peaks: kinds = {list(kinds)!r}: use one or more of {', '.join(EVALUATORS)}")
    if not archs:
        raise ConfigError("measure_trial_peaks: archs = []: name at least one architecture, e.g. ['resnet18']")
    started = time.perf_counter()
    torch_device = resolve_device(device if device != "auto" else config.device, "eval.device")
    on_cuda = torch_device.type == "cuda"
    peak_of = (lambda: cuda_peak(torch_device)) if on_cuda else rss_peak
    array = image_array(images)
    row_of_id = default_row_map(images)
    ids = sorted({i for col in ("train_ids", "test_ids") for ids in episodes[col] for i in ids})
    local = {image_id: k for k, image_id in enumerate(ids)}
    extract_rows = np.arange(min(len(array), 2 * config.batch_size))
    rng = np.random.default_rng(0)
    probe_config = dataclasses.replace(config.probe, workers=1)
    by_arch: dict[str, dict[str, int]] = {}
    for arch in dict.fromkeys(archs):
        by_arch[arch] = {}
        for kind in dict.fromkeys(kinds):
            backbone = BackboneSpec(init="random", arch=arch).build()
            with peak_of() as peak:
                if kind in ("probe", "knn"):
                    extract_features(backbone, array, extract_rows, config.preprocessing(),
                                     dataclasses.replace(config.extraction(), device=str(torch_device)),
                                     what=f"dry run of {arch}")
                    feats = rng.standard_normal((len(ids), backbone.feature_dim)).astype(np.float32)
                    if kind == "probe":
                        fit_probes(feats, _largest_episodes(episodes, probe_episodes), local, probe_config)
                    else:
                        knn_scores(feats, episodes, local, config.knn)
                else:
                    episode = _largest_episodes(episodes, 1)
                    train, y_train, test, y_test = episode_arrays(episode, row_of_id)[0]
                    finetune = dataclasses.replace(config.finetune, epochs=1, device=str(torch_device))
                    finetune_episode(backbone, images, train, y_train, test, y_test, finetune,
                                     config.preprocessing(), seed=0)
            by_arch[arch][kind] = max(1, int(peak["peak"]))  # a positive number: nothing measured is not a plan
            del backbone
            if on_cuda:
                torch.cuda.empty_cache()
    peaks = {kind: max(by_arch[a][kind] for a in by_arch) for kind in dict.fromkeys(kinds)}
    total = (torch.cuda.get_device_properties(torch_device).total_memory if on_cuda else available_memory())
    return Measurement(peaks, by_arch, torch_device.type, int(total), time.perf_counter() - started)


Measure = Callable[..., Measurement]


def measure_from_files(kinds: Sequence[str], archs: Sequence[str], cache_path: str, episodes_path: str,
                       eval_flat: Mapping[str, Any], device: str = "auto") -> Measurement:
    """:func:`measure_trial_peaks` on a sweep's files (image cache folder, episodes Parquet) and
    flat ``eval.*`` config: what a child process is given (plain values pickle)."""
    from cxrtune.data.cache import ImageCache
    from cxrtune.data.tasks import load_episodes
    from cxrtune.evaluate.run import EvalConfig

    config = EvalConfig.from_flat({k.removeprefix("eval."): v for k, v in eval_flat.items()})
    return measure_trial_peaks(kinds, archs, ImageCache.open(cache_path), load_episodes(episodes_path), config, device)


def measure_in_child(kinds: Sequence[str], archs: Sequence[str], cache_path: str, episodes_path: str,
                     eval_flat: Mapping[str, Any], device: str = "auto") -> Measurement:
    """:func:`measure_from_files` in a fresh (spawned) process, so that the sweep's driver never
    creates a CUDA context of its own (it would hold about 500 MiB of the card the trials are
    planned to fill) and the measurement starts from an empty allocator."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_from_files, list(kinds), list(archs), str(cache_path), str(episodes_path),
                           dict(eval_flat), device).result()


def process_peaks() -> dict[str, float]:
    """This process's peak memory so far, as a trial reports it: ``peak_rss_bytes`` (the
    lifetime high-water mark of its resident memory) and, where CUDA was used,
    ``peak_gpu_reserved_bytes`` (the caching allocator's peak, what the memory cap limits)."""
    out = {"peak_rss_bytes": float(_maxrss_bytes())}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_reserved_bytes"] = float(torch.cuda.max_memory_reserved())
    return out
