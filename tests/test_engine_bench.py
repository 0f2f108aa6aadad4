"""The benchmarks run (tiny sizes, CPU) and report consistent numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_throughput_runs_tiny_on_cpu():
    bench = _load("gpu_throughput")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = bench.measure("moco", torch.device("cpu"), tiny=True, batch=4, compile_=False, channels_last=False,
                          steps=1, warmup=0, peak=1.0)
    finally:
        torch.set_num_threads(threads)
    # MoCo: query forward + backward (~3 forwards) + key forward: about 4 ResNet18 forwards at 32 px.
    r18_forward_gflop = 2 * 1.82 * (32 / 224) ** 2
    assert 3.5 * r18_forward_gflop < r["gflop_per_image"] < 4.5 * r18_forward_gflop
    assert r["images_per_s"] > 0
    assert r["mfu"] == pytest.approx(r["gflop_per_image"] * r["images_per_s"] / 1e3, rel=0.05)  # peak 1 TFLOP/s


def test_augment_bench_pipelines_agree_on_shape_and_scale():
    bench = _load("augment_throughput")
    import numpy as np
    from cxrtune.augment import AugmentConfig, BatchAugment

    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    from PIL import Image

    cfg = AugmentConfig()
    ref = bench.per_sample_pipeline(48, cfg)(Image.fromarray(images[0]))
    ours = BatchAugment(cfg, 48, torch.Generator().manual_seed(0))(torch.from_numpy(images))
    assert ref.shape == ours.shape[1:] == (1, 48, 48)
