"""Device-side batched augmentation vs the study's per-sample pipeline, images/s per CPU core.

Both sides make two views per image from the same uint8 cache with the same recipe (the study's
MoCo recipe: random resized crop, flip, rotation +-10, brightness/contrast 0.8 with p 0.8,
blur kernel 9 with p 0.5, normalisation, noise 0.1). The per-sample side is what a DataLoader
worker does: torchvision transforms on a PIL image, one image at a time. Both run on one thread
(``torch.set_num_threads(1)``), so the ratio is per core. The two sides alternate for
``--rounds`` rounds, so that load from other processes hits both alike; each round gives a
ratio, and the summary is the median round. Output: one line per round, the median, and JSON.

    python bench/augment_throughput.py [--size 224] [--cache-size 256] [--images 256] [--batch 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from cxrtune.augment import XRAY_MEAN, XRAY_STD, AugmentConfig, BatchAugment


def per_sample_pipeline(size: int, cfg: AugmentConfig):
    return T.Compose([
        T.RandomResizedCrop(size, scale=(cfg.crop_scale_min, cfg.crop_scale_max)),
        T.RandomHorizontalFlip(cfg.hflip_p),
        T.RandomRotation(cfg.rotation_deg),
        T.RandomApply([T.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast)], p=cfg.jitter_p),
        T.RandomApply([T.GaussianBlur(cfg.blur_kernel, (cfg.blur_sigma_min, cfg.blur_sigma_max))], p=cfg.blur_p),
        T.ToTensor(),
        T.Normalize([XRAY_MEAN], [XRAY_STD]),
    ])


def run_per_sample(images: np.ndarray, size: int, cfg: AugmentConfig, views: int = 2) -> float:
    pipeline = per_sample_pipeline(size, cfg)
    start = time.perf_counter()
    for row in images:
        for _ in range(views):
            x = pipeline(Image.fromarray(row))
            x = x + cfg.noise_std * torch.randn_like(x)
    return len(images) / (time.perf_counter() - start)


def run_batched(images: np.ndarray, size: int, cfg: AugmentConfig, batch: int, views: int = 2) -> float:
    augment = BatchAugment(cfg, size, torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        u8 = torch.from_numpy(images[i:i + batch])
        for _ in range(views):
            augment(u8)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="output view side (px)")
    parser.add_argument("--cache-size", type=int, default=256, help="side of the cached uint8 images")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.cache_size, args.cache_size), dtype=np.uint8)
    cfg = AugmentConfig()
    run_batched(images[: args.batch], args.size, cfg, args.batch)  # warm-up
    per_sample, batched = [], []
    for round_ in range(args.rounds):
        per_sample.append(run_per_sample(images, args.size, cfg))
        batched.append(run_batched(images, args.size, cfg, args.batch))
        print(f"round {round_ + 1}: per-sample {per_sample[-1]:7.1f}  batched {batched[-1]:7.1f} images/s"
              f"  ratio {batched[-1] / per_sample[-1]:5.2f}x")
    ratios = [b / p for b, p in zip(batched, per_sample)]
    result = {"threads": args.threads, "size": args.size, "cache_size": args.cache_size, "views": 2,
              "rounds": args.rounds, "per_sample_images_per_s": round(statistics.median(per_sample), 1),
              "batched_images_per_s": round(statistics.median(batched), 1),
              "ratio": round(statistics.median(ratios), 2), "ratios": [round(r, 2) for r in ratios]}
    print(f"per-sample torchvision on PIL : {result['per_sample_images_per_s']:8.1f} images/s "
          f"(median, 2 views each, {args.threads} thread)")
    print(f"batched on device (cxrtune)   : {result['batched_images_per_s']:8.1f} images/s "
          f"(median, 2 views each, {args.threads} thread)")
    print(f"ratio (median round)          : {result['ratio']:8.2f}x  (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
