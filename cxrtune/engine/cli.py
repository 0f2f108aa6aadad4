"""``cxrtune pretrain``: one pretraining run in this process, with a progress bar.

    cxrtune pretrain --method moco --source phantom --profile cpu --out runs/moco-cpu
    cxrtune pretrain --method barlow --source nih --root /data/nih --profile study --out runs/bt \\
        --set optim.lr=1e-3 --set train.epochs=50

The source's uint8 cache is built on first use (``cxrtune data cache``) and reused after. The run
folder receives ``checkpoints/epoch-NNNN.pt``, ``metrics.jsonl`` and ``config.json``; running the
same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxrtune.engine.config import METHOD_NAMES
from cxrtune.engine.profiles import PROFILES
from cxrtune.errors import CxrtuneError

#: The cache side each profile trains from: the study cropped 224 px views from 256 px images.
DEFAULT_CACHE_SIZE = {"study": 256, "cpu": 64, "smoke": 64}


def add_pretrain_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pretrain", help="run one SSL pretraining (moco, barlow, spark, dino)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=METHOD_NAMES)
    p.add_argument("--profile", default="study", choices=sorted(PROFILES),
                   help="starting settings: study (224 px, GPU), cpu (64 px, 2 cores, < 1 h), smoke (seconds)")
    p.add_argument("--source", default="phantom", help="data source: phantom, nih, padchest or csv")
    p.add_argument("--root", default=None, help="folder of the source's files (not needed for phantom)")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="source option, repeatable")
    p.add_argument("--size", type=int, default=None,
                   help="side of the cached images (default: 256 for study, 64 for cpu and smoke)")
    p.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="pretrain on this split only (default: every cached image, labels are unused)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, config.json)")
    p.add_argument("--epochs", type=int, default=None, help="shortcut for --set train.epochs=N")
    p.add_argument("--init", default=None, help="shortcut for --set model.init=... (random, imagenet or a checkpoint)")
    p.add_argument("--weights", default=None,
                   help="local torchvision ImageNet weights file for --init imagenet (nothing is downloaded)")
    p.add_argument("--device", default=None, help="shortcut for --set train.device=DEV (auto, cpu, cuda)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config value by dotted key, repeatable (e.g. moco.variance_weight=0)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the run folder has checkpoints")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; use 1 on a loaded machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_pretrain)
    return p


def resolve_config(args: argparse.Namespace):
    from cxrtune.cli import parse_options

    overrides = parse_options(args.overrides, "--set")
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.device is not None:
        overrides["train.device"] = args.device
    if args.init is not None:
        overrides["model.init"] = args.init
    if args.weights is not None:
        overrides["model.weights"] = args.weights
    return PROFILES[args.profile](args.method).override(overrides)


def run_pretrain(args: argparse.Namespace) -> int:
    from cxrtune.cli import parse_options
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source
    from cxrtune.engine.train import pretrain

    config = resolve_config(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.print_config:
        print(json.dumps(config.to_flat(), indent=1, sort_keys=True))
        return 0
    source = make_source(args.source, args.root, **parse_options(args.option))
    size = args.size or DEFAULT_CACHE_SIZE[args.profile]
    cache = get_cache(source, size=size, progress=not args.quiet)
    rows = None
    if args.split is not None:
        rows = cache.index.loc[cache.index["split"] == args.split, "cache_row"].to_numpy()
        if len(rows) == 0:
            raise CxrtuneError(f"--split {args.split}: the {args.source} cache has no image in that split")
    out = Path(args.out)
    print(f"pretraining {config.method} ({config.model.arch}, {config.train.image_size} px) on "
          f"{len(rows) if rows is not None else len(cache.images)} {args.source} images -> {out}")

    def report(metrics: dict) -> None:
        if not args.quiet:
            print(f"epoch {metrics['epoch']:4d}  loss {metrics['ssl_loss']:.4f}  std {metrics['feature_std']:.3f}  "
                  f"rank {metrics['effective_rank']:.1f}  cos {metrics['mean_cosine']:.3f}  "
                  f"{metrics['images_per_s']:.0f} img/s  lr {metrics['lr']:.3g}", flush=True)

    result = pretrain(config, cache.images, out, rows=rows, callback=report, resume=not args.no_resume,
                      progress=not args.quiet)
    print(f"{result.status} after {result.epochs_completed} epochs; checkpoint {result.checkpoint}")
    return 0
