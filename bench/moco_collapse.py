"""When does the variance term keep MoCo's backbone from collapsing? A small seeded experiment.

The study saw plain MoCo's backbone feature std fall from 0.363 to 0.060 on homogeneous chest
X-rays with weak augmentations, and credited the variance term (on the raw projections) with
preventing it. This script reproduces the setting small: 64 near-identical 32 px images
(``tests/_engine_fixtures.homogeneous_images``), crops of 90-100 % and nothing else, ResNet18,
SGD, one CPU thread; and runs plain MoCo (weight 0) next to the variance term (weight 1) under
several optimiser settings. For each run it prints, on the training images with BatchNorm on
their own statistics (the features the loss sees):

- ``std``: mean per-dimension std of the pooled backbone features (the study's monitor), first
  epoch and last;
- ``cv``: the same std divided by the mean absolute feature value (scale-free: a backbone that
  only shrinks all its features keeps its cv);
- ``erank`` and ``cos``: effective rank and mean cosine over 2,048 fixed pairs of images (the
  engine's ``CollapseMonitor``, as the trials report them);
- ``var``: the variance-term value on the raw projections (0 = every projection dimension has
  std >= 1).

    python bench/moco_collapse.py                  # every setting, about 3 CPU-minutes
    python bench/moco_collapse.py --settings study-wd --epochs 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

WEAK_AUGMENT = {"augment.crop_scale_min": 0.9, "augment.rotation_deg": 0.0, "augment.jitter_p": 0.0,
                "augment.blur_p": 0.0, "augment.noise_std": 0.0}
BASE = {"train.batch_size": 16, "train.image_size": 32, "train.monitor_images": 64,
        "train.checkpoint_every": 1000, "moco.queue_size": 256, "moco.projector_hidden": 512,
        "moco.projector_out": 128, "optim.lr": 0.05, "optim.warmup_epochs": 0, **WEAK_AUGMENT}
#: name -> overrides; "test" is tests/test_engine_collapse.py's setting.
SETTINGS = {
    "test": {"optim.weight_decay": 0.05},
    "wd-exempt": {"optim.weight_decay": 0.05, "optim.exclude_norm_bias_decay": True},
    "study-wd": {"optim.weight_decay": 1e-4},
    "no-wd": {"optim.weight_decay": 0.0},
}


def describe(backbone: torch.nn.Module, monitor) -> dict[str, float]:
    """The engine's collapse metrics on the monitor's images, BatchNorm on their own statistics,
    plus the scale-free std (std / mean absolute feature)."""
    from cxrtune.engine.monitors import collapse_metrics

    features = monitor.batch_stat_features(backbone).double()
    metrics = collapse_metrics(features, monitor.pairs)
    metrics["cv"] = metrics["feature_std"] / float(features.abs().mean().clamp(min=1e-12))
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--weights", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from cxrtune.engine import pretrain
    from cxrtune.profiles import smoke
    from cxrtune.engine.monitors import CollapseMonitor
    from cxrtune.models.backbone import build_backbone
    from tests._engine_fixtures import homogeneous_images

    images = homogeneous_images(64, 32, seed=args.seed)
    monitor = CollapseMonitor(images, 32, torch.device("cpu"))
    start = describe(build_backbone("resnet18", init="random", seed=args.seed), monitor)
    print(f"random init: std {start['feature_std']:.3f} cv {start['cv']:.3f} erank {start['effective_rank']:.1f} "
          f"cos {start['mean_cosine']:.3f}")
    print(f"{'setting':<10} {'weight':>6} {'std first':>9} {'std last':>8} {'cv last':>7} {'erank':>6} {'cos':>6} {'var':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            for weight in args.weights:
                config = smoke("moco").override({**BASE, **SETTINGS[name], "train.epochs": args.epochs,
                                                 "train.seed": args.seed, "moco.variance_weight": weight})
                result = pretrain(config, images, Path(tmp) / f"{name}-{weight}")
                last = describe(result.backbone, monitor)
                first = result.metrics[0]["feature_std_batch"]
                print(f"{name:<10} {weight:>6g} {first:>9.3f} {last['feature_std']:>8.3f} {last['cv']:>7.3f} "
                      f"{last['effective_rank']:>6.1f} {last['mean_cosine']:>6.3f} {result.metrics[-1]['variance']:>6.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
