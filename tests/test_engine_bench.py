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


def test_ssl_vs_random_combine_averages_runs_finding_by_finding(tmp_path, capsys):
    """--combine: each run's SSL - random difference and the runs' average, from their results files."""
    import pandas as pd

    bench = _load("ssl_vs_random")
    diseases = [f"finding{k}" for k in range(4)]
    gains = {"seed1": [0.04, 0.00, 0.02, -0.02], "seed2": [0.06, 0.02, 0.00, 0.00]}
    for run, gain in gains.items():
        rows = []
        for d, g in zip(diseases, gain):
            for trial in range(2):  # two trials per finding: their mean is the finding's AUROC
                rows.append({"backbone": "random", "shots": 20, "disease": d, "trial": trial, "auroc": 0.5 + 0.01 * trial})
                rows.append({"backbone": "ssl", "shots": 20, "disease": d, "trial": trial,
                             "auroc": 0.5 + 0.01 * trial + g})
        (tmp_path / run).mkdir()
        pd.DataFrame(rows).to_parquet(tmp_path / run / "results.parquet")
    bench.combine([tmp_path / "seed1", tmp_path / "seed2"])
    out = capsys.readouterr().out
    assert "20 shots, seed1: difference +0.010" in out
    assert "20 shots, seed2: difference +0.020" in out
    assert "20 shots, average of 2 runs: difference +0.015" in out
    with pytest.raises(SystemExit, match="does not exist"):
        bench.combine([tmp_path / "seed1", tmp_path / "missing"])
    other = pd.read_parquet(tmp_path / "seed2" / "results.parquet").assign(shots=5)  # another protocol
    (tmp_path / "five").mkdir()
    other.to_parquet(tmp_path / "five" / "results.parquet")
    with pytest.raises(SystemExit, match="do not share their"):
        bench.combine([tmp_path / "seed1", tmp_path / "five"])


def test_ssl_vs_random_reprobe_refuses_a_folder_that_is_not_a_run_before_building_a_cache(tmp_path, monkeypatch):
    import argparse

    bench = _load("ssl_vs_random")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "episodes.parquet").write_bytes(b"")
    import cxrtune.data.cache as cache

    monkeypatch.setattr(cache, "get_cache", lambda *a, **k: pytest.fail("built a cache for a folder that is not a run"))
    with pytest.raises(SystemExit, match=r"holds no run/checkpoints/epoch-\*.pt, run/config.json"):
        bench.reprobe([tmp_path], argparse.Namespace(threads=1, probe_size=128, size=64, n_pretrain=10, val_pos=2))


def test_retrieval_bench_refuses_a_size_the_cpu_recipe_does_not_train_at():
    """The default recipe is the cpu profile's augmentation at its own image size: another --size
    is refused before anything is rendered, with the valid choices named."""
    bench = _load("phantom_retrieval")
    with pytest.raises(SystemExit, match=r"--size 32: the cpu profile trains at 64 px; use --size 64 or --recipe mild"):
        bench.main(["--size", "32"])
