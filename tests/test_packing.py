"""Packing few-shot trials by measured memory (cxrtune.packing, cxrtune.sweep.packing), the
message of a trial over its memory cap, and the shared, locked feature cache. No GPU: the planner
is driven with fake measurements, CUDA's out-of-memory error is raised by hand."""

from __future__ import annotations

import argparse
import math
import random
import threading
import time

import numpy as np
import pytest
import torch

from cxrtune.errors import ConfigError, CxrtuneError
from cxrtune.packing import (
    CUDA_CONTEXT_BYTES,
    GIB,
    MIB,
    SAFETY_MARGIN,
    WORKER_BASE_BYTES,
    Measurement,
    MemoryCapError,
    cpu_share,
    over_cap_as_error,
    plan_cpu,
    plan_gpu,
    round_share,
)

# -------------------------------------------------------------------------------------------
# The planner
# -------------------------------------------------------------------------------------------


def test_small_trials_are_capped_by_max_per_gpu_and_share_the_cores():
    plan = plan_gpu({"probe": 2 * GIB}, 80 * GIB, cores=16)
    # need = 2 GiB x 1.25 + 500 MiB = 2.988 GiB: 26 fit in 80 GiB, the default cap is 8
    assert plan.need_bytes == int(2 * GIB * 1.25 + 500 * MIB)
    assert (plan.per_device, plan.gpu, plan.cpu, plan.limited_by) == (8, 0.125, 2.0, "--max-per-gpu")
    assert plan.resources == {"cpu": 2.0, "gpu": 0.125}
    assert plan.line() == ("packing: probe trials need 2.00 GiB measured (x1.25 margin + 0.49 GiB CUDA context = "
                           "2.99 GiB) -> 0.125 GPU each, 8 per GPU of 80.00 GiB (capped by --max-per-gpu 8), "
                           "2 CPU each")
    assert plan_gpu({"probe": 2 * GIB}, 80 * GIB, cores=16, max_per_device=32).per_device == 26


def test_mixed_kinds_take_the_largest_kinds_share_by_memory():
    plan = plan_gpu({"probe": 6 * GIB, "finetune": 14 * GIB}, 40 * GIB, cores=8)
    # finetune: 14 x 1.25 + 0.49 = 17.99 GiB; 40 // 17.99 = 2 per GPU
    assert plan.kind == "finetune" and plan.peak_bytes == 14 * GIB
    assert (plan.per_device, plan.gpu, plan.cpu, plan.limited_by) == (2, 0.5, 4.0, "memory")
    params = plan.mlflow_params()
    assert params["packing.gpu_per_trial"] == 0.5 and params["packing.peak_mib.finetune"] == 14 * 1024.0
    assert params["packing.peak_mib.probe"] == 6 * 1024.0 and params["packing.sizing_kind"] == "finetune"


def test_more_trials_than_cores_get_a_fraction_of_a_core_and_two_gpus_split_the_cores():
    assert plan_gpu({"knn": 100 * MIB}, 24 * GIB, cores=4).cpu == 0.5  # 8 trials on 4 cores
    assert plan_gpu({"knn": 100 * MIB}, 24 * GIB, cores=32, gpus=2).cpu == 2.0  # 16 trials on 32 cores
    assert cpu_share(16, 3) == 5.0 and cpu_share(2, 3) == 0.6666  # Ray refuses fractions above 1


def test_every_share_holds_its_trials_need_and_packs_the_card():
    """Against the rule worked independently: floor(total / need) trials, at most the cap, each
    holding share x total >= need, all together no more than the card."""
    rng = random.Random(7)
    for _ in range(500):
        total = rng.uniform(4, 200) * GIB
        peak = rng.uniform(0.01, 0.7) * (total - CUDA_CONTEXT_BYTES) / SAFETY_MARGIN
        cap = rng.randint(1, 64)
        plan = plan_gpu({"probe": peak}, total, cores=8, max_per_device=cap)
        need = int(peak) * SAFETY_MARGIN + CUDA_CONTEXT_BYTES
        assert plan.per_device * plan.gpu <= 1.0
        assert plan.gpu * total >= need - 1
        assert plan.per_device <= min(cap, math.floor(total / need))
        assert plan.per_device >= min(cap, math.floor(total / need)) - 1  # rounding the share down costs one at most
        assert plan.gpu == round(plan.gpu, 4) > 0


def test_a_trial_larger_than_the_card_is_refused_with_the_numbers_and_the_setting():
    with pytest.raises(ConfigError, match=r"one probe trial needs 30\.20 GiB measured x 1\.25 margin \+ 0\.49 GiB "
                                          r"CUDA context = 38\.24 GiB, more than this GPU's 24\.00 GiB: lower "
                                          r"eval\.batch_size"):
        plan_gpu({"probe": 30.2 * GIB}, 24 * GIB, cores=4)
    with pytest.raises(ConfigError, match=r"one finetune trial needs .* more than this machine's 1\.00 GiB of "
                                          r"available memory: lower eval\.batch_size"):
        plan_cpu({"finetune": 2 * GIB}, 1 * GIB, cores=2)


@pytest.mark.parametrize("call, message", [
    (lambda: plan_gpu({}, GIB, cores=1), r"no trial kind was measured \(peaks = \{\}\)"),
    (lambda: plan_gpu({"probe": 0}, GIB, cores=1), r"measured peak of 'probe' trials = 0: use a finite number of bytes > 0"),
    (lambda: plan_gpu({"probe": -5.0}, GIB, cores=1), r"'probe' trials = -5\.0"),
    (lambda: plan_gpu({"probe": float("nan")}, GIB, cores=1), r"'probe' trials = nan"),
    (lambda: plan_gpu({"probe": MIB}, 0, cores=1), r"the GPU's total memory = 0: use a number of bytes > 0"),
    (lambda: plan_gpu({"probe": MIB}, GIB, cores=1, margin=0.9), r"margin = 0\.9: use a number >= 1"),
    (lambda: plan_gpu({"probe": MIB}, GIB, cores=1, max_per_device=0), r"--max-per-gpu = 0: use an integer >= 1"),
    (lambda: plan_gpu({"probe": MIB}, GIB, cores=0), r"cores = 0: use an integer >= 1"),
    (lambda: plan_cpu({"probe": MIB}, -1, cores=2), r"available memory = -1: use a number of bytes > 0"),
])
def test_bad_planner_inputs_are_refused_by_name(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_cpu_plan_by_cores_and_by_memory():
    by_cores = plan_cpu({"probe": 300 * MIB}, 8 * GIB, cores=2)
    assert (by_cores.per_device, by_cores.cpu, by_cores.gpu, by_cores.limited_by) == (2, 1.0, None, "cores")
    assert by_cores.need_bytes == int(300 * MIB * 1.25 + WORKER_BASE_BYTES)
    assert by_cores.resources == {"cpu": 1.0}
    # 2 GiB hold one trial of 0.37 + 1 GiB: it gets all four cores
    by_memory = plan_cpu({"probe": 300 * MIB}, 2 * GIB, cores=4)
    assert (by_memory.per_device, by_memory.cpu, by_memory.limited_by) == (1, 4.0, "memory")
    assert "4 CPU each, 1 at once on 4 cores and 2.00 GiB available (limited by memory)" in by_memory.line()


def test_round_share_stays_within_what_ray_takes():
    assert round_share(1 / 3) == 0.3333 and round_share(1.0) == 1.0 and round_share(1e-9) == 0.0001


# -------------------------------------------------------------------------------------------
# The sweep's plan (flags, fake measurement)
# -------------------------------------------------------------------------------------------


def _args(**given):
    values = {"pack": "auto", "gpu": None, "cpu": None, "cpus": None, "max_per_gpu": 8, **given}
    return argparse.Namespace(**values)


class FakeMeasure:
    def __init__(self, peaks, total):
        self.peaks, self.total, self.calls = peaks, total, []

    def __call__(self, kinds, archs, cache, episodes, flat, device):
        self.calls.append((tuple(kinds), tuple(archs), device))
        return Measurement(dict(self.peaks), {a: dict(self.peaks) for a in archs}, device, self.total, 0.5)


def _plan(args, measure, **kw):
    from cxrtune.sweep.packing import plan_packing

    return plan_packing(args, {"eval.batch_size": 64}, ["resnet18", "resnet50"], ["probe", "finetune"], "/cache",
                        "/episodes.parquet", measure=measure, **kw)


def test_sweep_plans_the_gpu_share_from_the_measurement():
    measure = FakeMeasure({"probe": 1 * GIB, "finetune": 3 * GIB}, 24 * GIB)
    plan = _plan(_args(), measure, gpus=1, cores=16)
    assert measure.calls == [(("probe", "finetune"), ("resnet18", "resnet50"), "cuda")]
    # finetune: 3 x 1.25 + 0.49 = 4.24 GiB, 5 fit in 24 GiB
    assert (plan.gpu, plan.per_device, plan.cpu, plan.kind) == (0.2, 5, 3.0, "finetune")


def test_given_gpu_share_overrides_and_is_checked_against_the_measurement():
    measure = FakeMeasure({"probe": 1 * GIB, "finetune": 3 * GIB}, 24 * GIB)
    plan = _plan(_args(gpu=0.125), measure, gpus=1, cores=16)
    assert plan.resources == {"cpu": 2.0, "gpu": 0.125} and plan.limited_by == "--gpu"
    assert plan.line().startswith("packing: --gpu given: 0.125 GPU each (8 per GPU), 2 CPU each; measured: "
                                  "finetune trials need 3.00 GiB measured")
    assert "would plan 0.2 GPU each" in plan.line()
    assert "WARNING: 0.125 x 24.00 GiB = 3.00 GiB is less than the 4.24 GiB one finetune trial needs" in plan.line()
    assert plan.mlflow_params()["packing.peak_mib.finetune"] == 3 * 1024.0  # the measurement is still logged
    assert "WARNING" not in _plan(_args(gpu=0.25), measure, gpus=1, cores=16).line()


def test_cpu_sweep_plans_by_memory_and_cores_unless_cpu_is_given_or_packing_is_off():
    measure = FakeMeasure({"probe": 200 * MIB}, 0)
    plan = _plan(_args(), measure, gpus=0, cores=2, memory=16 * GIB)
    assert plan.resources == {"cpu": 1.0} and plan.per_device == 2 and plan.limited_by == "cores"
    assert measure.calls[0][2] == "cpu"

    def never(*_):
        raise AssertionError("no measurement when the share is given or packing is off")

    assert _plan(_args(cpu=0.5), never, gpus=0, cores=2).resources == {"cpu": 0.5}
    off = _plan(_args(pack="off"), never, gpus=1, cores=2)
    assert off.resources == {"cpu": 1.0} and off.line() == "packing: --pack off given: 1 CPU each"
    assert _plan(_args(pack="off", gpu=0.5), never, gpus=1).resources == {"cpu": 1.0, "gpu": 0.5}


def test_sweep_parser_takes_the_packing_flags():
    from _sweep_fixtures import load_sweep_script

    from cxrtune.sweep.fewshot import build_parser

    parser = build_parser(load_sweep_script("fewshot_grid"))
    args = parser.parse_args(["--pack", "off", "--max-per-gpu", "4"])
    assert (args.pack, args.max_per_gpu, args.cpu, args.gpu) == ("off", 4, None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["--pack", "maybe"])


# -------------------------------------------------------------------------------------------
# A trial over its cap
# -------------------------------------------------------------------------------------------


def _oom():
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 4.00 GiB allowed)")


def test_an_over_cap_trial_names_its_share_the_measured_peak_and_the_flag():
    with pytest.raises(MemoryCapError) as caught, \
            over_cap_as_error(0.05, 80 * GIB, {"probe": 2 * GIB, "finetune": 5 * GIB}, "probe"):
        _oom()
    message = str(caught.value)
    assert isinstance(caught.value, CxrtuneError) and isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert "--gpu share 0.05 = 4.00 GiB of the card's 80.00 GiB" in message
    assert "a probe trial was measured at 2.00 GiB before the sweep (x1.25 margin + 0.49 GiB CUDA context = " \
           "2.99 GiB, share >= 0.0374)" in message
    assert "Raise --gpu" in message and "torch said: CUDA out of memory. Tried to allocate 2.00 GiB" in message


def test_without_a_measurement_or_a_cap_the_error_says_so_or_passes_through():
    given = r"share 0\.25 = 2\.00 GiB .*no measured peak is known \(the share was given with --gpu\)"
    with pytest.raises(MemoryCapError, match=given), over_cap_as_error(0.25, 8 * GIB, None, "probe"):
        _oom()
    # no cap: not ours to explain
    with pytest.raises(torch.OutOfMemoryError), over_cap_as_error(None, 8 * GIB, {"probe": GIB}, "probe"):
        _oom()
    # other errors pass unchanged; cuBLAS's failed workspace allocation is out of memory too
    with pytest.raises(ValueError, match="other"), over_cap_as_error(0.25, 8 * GIB, None, "probe"):
        raise ValueError("other")
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"), over_cap_as_error(0.25, GIB):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm")
    with pytest.raises(MemoryCapError, match="torch said: CUDA error: CUBLAS_STATUS_ALLOC_FAILED"), \
            over_cap_as_error(0.25, GIB):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")


def test_the_trainables_guard_reads_the_plan_the_sweep_passed():
    from cxrtune.trainables._resources import memory_cap

    plan = plan_gpu({"finetune": 3 * GIB}, 24 * GIB, cores=4)
    message = r"--gpu share 0\.05 = 1\.20 GiB of the card's 24\.00 GiB; a finetune trial was measured at 3\.00 GiB"
    with pytest.raises(MemoryCapError, match=message), memory_cap(0.05, plan.trial_info(), "finetune"):
        _oom()


# -------------------------------------------------------------------------------------------
# The measurement (CPU, smoke size)
# -------------------------------------------------------------------------------------------


def test_measuring_probe_and_finetune_on_cpu_gives_positive_peaks(tmp_path, monkeypatch):
    from _sweep_fixtures import write_eval_archive

    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source
    from cxrtune.data.tasks import build_task_pool, sample_episodes
    from cxrtune.evaluate.run import EvalConfig
    from cxrtune.packing import measure_trial_peaks

    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    archive = write_eval_archive(tmp_path / "eval")
    cache = get_cache(make_source("csv", archive["root"]), size=32)
    episodes = sample_episodes(build_task_pool(cache.index), shots=(1, 5), trials=1)
    config = EvalConfig.from_flat({"input_size": 32, "crop_fraction": 1.0, "batch_size": 32, "device": "cpu"})
    started = time.perf_counter()
    measured = measure_trial_peaks(["probe", "finetune"], ["resnet18"], cache, episodes, config)
    assert time.perf_counter() - started < 20
    assert measured.device == "cpu" and measured.total_bytes > 0
    assert set(measured.peaks) == {"probe", "finetune"} and all(v > 0 for v in measured.peaks.values())
    assert measured.by_arch["resnet18"] == measured.peaks
    # the finetune step keeps a model copy, gradients and AdamW state: more than the probe's extraction
    assert measured.peaks["finetune"] > 4 * MIB
    with pytest.raises(ConfigError, match=r"kinds = \['linear'\]: use one or more of probe, knn, finetune"):
        measure_trial_peaks(["linear"], ["resnet18"], cache, episodes, config)


# -------------------------------------------------------------------------------------------
# Shared feature extraction
# -------------------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """extract_features wrapped to count its calls (and slowed so that two callers overlap)."""
    from cxrtune.evaluate import features

    calls = []
    real = features.extract_features

    def counting(model, images, rows, *args, **kwargs):
        calls.append(kwargs.get("what"))
        time.sleep(0.3)
        return real(model, images, rows, *args, **kwargs)

    monkeypatch.setattr(features, "extract_features", counting)
    return calls


def _images():
    return np.random.default_rng(0).integers(0, 256, size=(12, 32, 32), dtype=np.uint8)


def _cached(spec, root, images, rows=range(12)):
    from cxrtune.evaluate.features import ExtractConfig, cached_features
    from cxrtune.evaluate.preprocess import PreprocessConfig

    return cached_features(spec, images, list(rows), PreprocessConfig(input_size=32, crop_fraction=1.0),
                           ExtractConfig(device="cpu", batch_size=8), root=root)


def test_two_trials_of_one_backbone_at_once_extract_once_and_agree(tmp_path, counted):
    from cxrtune.evaluate.features import BackboneSpec

    images = _images()
    spec = BackboneSpec(init="random", arch="resnet18", seed=3)
    out = [None, None]

    def trial(i):
        out[i] = _cached(spec, tmp_path, images)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(counted) == 1
    assert sorted(meta["cached"] for _, _, meta in out) == [False, True]
    np.testing.assert_array_equal(out[0][1], out[1][1])
    # another backbone is extracted on its own
    _cached(BackboneSpec(init="random", arch="resnet18", seed=4), tmp_path, images)
    assert len(counted) == 2


def test_cached_features_equal_uncached_extraction_and_a_corrupt_entry_is_rebuilt(tmp_path, counted):
    from cxrtune.evaluate.features import BackboneSpec, ExtractConfig, extract_features
    from cxrtune.evaluate.preprocess import PreprocessConfig

    images = _images()
    spec = BackboneSpec(init="random", arch="resnet18", seed=5)
    rows, feats, meta = _cached(spec, tmp_path, images, rows=[7, 2, 2, 9])
    assert list(rows) == [2, 7, 9] and not meta["cached"]
    direct = extract_features(spec.build(), images, [2, 7, 9], PreprocessConfig(input_size=32, crop_fraction=1.0),
                              ExtractConfig(device="cpu", batch_size=8))
    np.testing.assert_array_equal(feats, direct)
    [npy] = list((tmp_path / "features").glob("*.npy"))
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])  # a half-written file (a copy cut off)
    calls = len(counted)
    rows, again, meta = _cached(spec, tmp_path, images, rows=[7, 2, 9])
    assert not meta["cached"] and len(counted) == calls + 1
    np.testing.assert_array_equal(again, direct)
    assert _cached(spec, tmp_path, images, rows=[2, 7, 9])[2]["cached"]  # and trusted once whole


def test_the_planner_is_core_and_imports_no_ray():
    """cxrtune core never imports Ray: the planner and the measurement run in a plain process (the
    sweep's part, cxrtune.sweep.packing, lives in the package that may)."""
    import subprocess
    import sys

    code = "import sys, cxrtune.packing; assert 'ray' not in sys.modules, 'ray imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
