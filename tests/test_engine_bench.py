"""The benchmarks run (tiny sizes, CPU) and report consistent numbers."""

from __future__ import annotations


import pytest
import torch

from _bench import load_bench as _load


def _resnet18_forward_flops(size: int, in_chans: int) -> int:
    """FLOPs of one torchvision ResNet18 forward (no classifier) per image, counted by torch's
    FlopCounterMode on a model built here, not the benchmark's."""
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # shapes only: nothing is initialised or computed
        model = torchvision.models.resnet18()
        if in_chans != 3:
            model.conv1 = torch.nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        model.fc = torch.nn.Identity()
        model.eval()  # batch-norm statistics of one image
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, in_chans, size, size))
    return counter.get_total_flops()


def test_gpu_throughput_runs_tiny_on_cpu(monkeypatch):
    """FLOPs per image against an independent count, images/s against the benchmark's own clock
    readings and the steps it ran between them, MFU against achieved / the peak passed in."""
    import time as real_time
    import types

    bench = _load("gpu_throughput")
    # The counter's convention: 2 FLOPs per multiply-add. ResNet18 at 224 px is 1.81 GMACs
    # (torchvision's published figure), so 3.63 GFLOPs.
    assert _resnet18_forward_flops(224, 3) == pytest.approx(2 * 1.814e9, rel=0.01)
    forward = _resnet18_forward_flops(32, 1)  # the tiny setting: ResNet18, one channel, 32 px

    steps_done = [0]  # training steps started, counted through the method the benchmark builds
    build_method = bench.build_method

    def counting_build_method(*args, **kwargs):
        method = build_method(*args, **kwargs)
        loss = method.training_loss

        def training_loss(*a, **k):
            steps_done[0] += 1
            return loss(*a, **k)

        method.training_loss = training_loss
        return method

    readings = []  # (clock value, steps done) at each clock reading of the benchmark

    def perf_counter():
        readings.append((real_time.perf_counter(), steps_done[0]))
        return readings[-1][0]

    monkeypatch.setattr(bench, "build_method", counting_build_method)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=perf_counter))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batch, steps, peak = 4, 2, 0.05  # peak in TFLOP/s, passed in
    try:
        outer_start = real_time.perf_counter()
        r = bench.measure("moco", torch.device("cpu"), tiny=True, batch=batch, compile_=False, channels_last=False,
                          steps=steps, warmup=1, peak=peak)
        outer = real_time.perf_counter() - outer_start
    finally:
        torch.set_num_threads(threads)
    assert (r["arch"], r["size"], r["batch"]) == ("resnet18", 32, batch)

    # MoCo per image: the query encoder's forward and backward (about 3 forwards; conv1 needs no
    # input gradient) and the key encoder's forward, plus small heads: about 4 ResNet18 forwards.
    expected_flops = 4 * forward
    assert r["gflop_per_image"] * 1e9 == pytest.approx(expected_flops, rel=0.08)

    # the timed window (the last two clock readings; the first two time the first step) holds
    # exactly the `steps` timed steps: not the FLOP-counting step, not the warm-up
    assert [done for _, done in readings[:2]] == [1, 2] and r["first_step_s"] >= 0
    (start, before), (end, after) = readings[-2], readings[-1]
    assert (before, after) == (2, 2 + steps)
    seconds = end - start
    assert 0 < seconds <= outer
    assert r["images_per_s"] == pytest.approx(steps * batch / seconds, rel=0.01)
    # plausibility: slower than the whole call's average can't be, and one thread is far below 1 TFLOP/s
    assert r["images_per_s"] >= (2 + steps) * batch / outer
    assert r["images_per_s"] * expected_flops < 1e12
    # MFU = achieved FLOP/s / peak FLOP/s, with the independent FLOP count
    achieved = expected_flops * steps * batch / seconds
    assert r["mfu"] == pytest.approx(achieved / (peak * 1e12), rel=0.1)


def test_augment_bench_pipelines_agree_on_shape_and_scale():
    """The per-sample torchvision pipeline and BatchAugment give views of one shape in the same
    normalised units: pixel for pixel with the random parts off (both equal the image's own
    normalised intensities), and in distribution with the full recipe."""
    import numpy as np
    from PIL import Image

    from _fixtures_layouts import structured_array
    from cxrtune.augment import XRAY_MEAN, XRAY_STD, AugmentConfig, BatchAugment

    bench = _load("augment_throughput")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = np.stack([structured_array("grey8", 64, 64, seed=s) for s in range(32)])
        u8 = torch.from_numpy(images)

        # Random parts off: a full-image crop resized 64 -> 48 px, normalised.
        still = AugmentConfig(crop_scale_min=1.0, crop_ratio_min=1.0, crop_ratio_max=1.0, hflip_p=0.0,
                              rotation_deg=0.0, jitter_p=0.0, blur_p=0.0, noise_std=0.0)
        ref = torch.stack([bench.per_sample_pipeline(48, still)(Image.fromarray(im)) for im in images[:16]])
        ours = BatchAugment(still, 48, torch.Generator().manual_seed(0))(u8[:16])
        assert ref.shape == ours.shape == (16, 1, 48, 48)
        assert (ref - ours).abs().mean() < 0.05  # antialiased vs plain bilinear resizing
        # both are the images' own intensities in the X-ray normalisation (resizing keeps the mean)
        own = torch.from_numpy((images[:16] / 255.0 - XRAY_MEAN) / XRAY_STD).float().mean(dim=(1, 2))
        torch.testing.assert_close(ref.mean(dim=(1, 2, 3)), own, atol=0.02, rtol=0)
        torch.testing.assert_close(ours.mean(dim=(1, 2, 3)), own, atol=0.02, rtol=0)

        # The full recipe, 8 views of each of 32 images: the same distribution of values.
        cfg = AugmentConfig()
        torch.manual_seed(0)  # torchvision's transforms draw from the global generator
        pipeline = bench.per_sample_pipeline(48, cfg)
        ref = torch.stack([pipeline(Image.fromarray(im)) for im in images for _ in range(8)])
        ref = ref + cfg.noise_std * torch.randn_like(ref)  # the noise bench.run_per_sample adds
        augment = BatchAugment(cfg, 48, torch.Generator().manual_seed(0))
        ours = torch.cat([augment(u8) for _ in range(8)])
    finally:
        torch.set_num_threads(threads)
    assert ref.shape == ours.shape == (256, 1, 48, 48)
    assert abs(ref.mean().item() - ours.mean().item()) < 0.25  # in std units of the normalisation
    assert ours.std().item() == pytest.approx(ref.std().item(), rel=0.15)
    q = torch.tensor([0.05, 0.5, 0.95])
    torch.testing.assert_close(torch.quantile(ours.flatten(), q), torch.quantile(ref.flatten(), q), atol=0.3, rtol=0)


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
