"""``cxrtune pretrain``: one pretraining run in this process, with a progress bar.

    cxrtune pretrain --method moco --source phantom --profile cpu --out runs/moco-cpu
    cxrtune pretrain --method barlow --source nih --root /data/nih --profile study --out runs/bt \\
        --set optim.lr=1e-3 --set train.epochs=50

The source's uint8 cache is built on first use (``cxrtune data cache``) and reused after. The run
folder receives ``checkpoints/epoch-NNNN.pt``, ``metrics.jsonl`` and ``config.json``; running the
same command again resumes from the latest checkpoint.

``--profile smoke`` is a plumbing check: 32 px images, two epochs, one torch thread and, on the
phantom source, a small phantom (:data:`SMOKE_PHANTOM`: 502 images, the sweeps' smoke phantom, so
the two share one cache; ``-o KEY=VALUE`` overrides any of it). It finishes in under a minute on
2 cores, the first run's cache build (a few seconds) included: measured 34 s wall (19 s CPU) with
a built cache and 39 s from an empty ``CXRTUNE_CACHE``, on 2 cores shared with other work. Its
losses and checkpoints mean nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxrtune.engine.config import METHOD_NAMES
from cxrtune.engine.profiles import PROFILES
from cxrtune.errors import ConfigError, CxrtuneError

#: The cache side each profile trains from: the study cropped 224 px views from 256 px images.
DEFAULT_CACHE_SIZE = {"study": 256, "cpu": 64, "smoke": 32}

#: ``--profile smoke --source phantom``: the phantom the sweeps' smoke profile uses
#: (cxrtune/sweep/cli.py PROFILES["smoke"]["phantom"]), not the full 13,900-image one.
SMOKE_PHANTOM = {"n_pretrain": 192, "studies_per_patient": 4, "train_pos": 20, "val_pos": 4,
                 "train_neg": 40, "val_neg": 30, "fewshot_studies": 1}

#: Side of a cached image (px): CacheConfig.size's range.
CACHE_SIZE_RANGE = (8, 4096)


def check_int_flag(flag: str, value: int | None, low: int, high: int | None = None, what: str = "") -> None:
    """Refuse an integer option outside ``[low, high]``, naming the flag, the value and the range.

    ``None`` (the option was not given) passes. Used by every command's numeric options, so that
    ``--size 0`` is an error instead of silently becoming a default.
    """
    if value is None:
        return
    if value < low or (high is not None and value > high):
        valid = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ConfigError(f"{flag} {value} is out of range: {what + ' ' if what else ''}must be {valid}")


def check_out_folder(flag: str, path: Path) -> None:
    """A run folder argument must be a folder or not exist yet (its parent must not be a file)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is an existing file, not a folder: pass a run folder "
                          "(it is created if missing) or remove the file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, so the run folder cannot be created there")
            break


def add_pretrain_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pretrain", help="run one SSL pretraining (moco, barlow, spark, dino)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=METHOD_NAMES)
    p.add_argument("--profile", default="study", choices=sorted(PROFILES),
                   help="starting settings: study (224 px, GPU), cpu (64 px, 2 cores, < 1 h), smoke (32 px, 2 epochs, "
                        "a 502-image phantom: under a minute on 2 cores, building its cache included)")
    p.add_argument("--source", default="phantom", help="data source: phantom, nih, padchest or csv")
    p.add_argument("--root", default=None, help="folder of the source's files (not needed for phantom)")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE",
                   help="source option, repeatable (with --profile smoke they override the small phantom)")
    p.add_argument("--size", type=int, default=None,
                   help="side of the cached images, 8 to 4096 px (default: 256 for study, 64 for cpu, 32 for smoke)")
    p.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="pretrain on this split only (default: every cached image, labels are unused)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, config.json)")
    p.add_argument("--epochs", type=int, default=None, help="shortcut for --set train.epochs=N (N >= 1)")
    p.add_argument("--init", default=None, help="shortcut for --set model.init=... (random, imagenet or a checkpoint)")
    p.add_argument("--weights", default=None,
                   help="local torchvision ImageNet weights file for --init imagenet (nothing is downloaded)")
    p.add_argument("--device", default=None,
                   help="shortcut for --set train.device=DEV (auto, cpu, cuda, cuda:N; cuda needs a CUDA GPU)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config value by dotted key, repeatable (e.g. moco.variance_weight=0)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the run folder has checkpoints")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch, >= 1 (default: 1 for smoke, else torch's choice; "
                        "use 1 on a loaded machine)")
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


def source_options(args: argparse.Namespace) -> dict:
    """``-o`` options, on top of :data:`SMOKE_PHANTOM` for ``--profile smoke --source phantom``."""
    from cxrtune.cli import parse_options

    options = parse_options(args.option)
    if args.profile == "smoke" and args.source == "phantom":
        options = {**SMOKE_PHANTOM, **options}
    return options


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers before anything is read or built."""
    check_int_flag("--size", args.size, *CACHE_SIZE_RANGE, what="the side of the cached images (px)")
    check_int_flag("--epochs", args.epochs, 1, what="the number of epochs")
    check_int_flag("--threads", args.threads, 1, what="the number of torch CPU threads")


def run_pretrain(args: argparse.Namespace) -> int:
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source
    from cxrtune.device import resolve_device
    from cxrtune.engine.train import pretrain

    check_arguments(args)
    config = resolve_config(args)
    if args.print_config:
        print(json.dumps(config.to_flat(), indent=1, sort_keys=True))
        return 0
    # Checked before the cache is built (minutes to hours), not when training starts.
    resolve_device(config.train.device, "--device" if args.device is not None else "train.device")
    out = Path(args.out)
    check_out_folder("--out", out)
    # smoke: one thread unless told otherwise; two threads on two loaded cores run 10x slower.
    threads = args.threads if args.threads is not None else (1 if args.profile == "smoke" else None)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    source = make_source(args.source, args.root, **source_options(args))
    size = args.size if args.size is not None else DEFAULT_CACHE_SIZE[args.profile]
    cache = get_cache(source, size=size, progress=not args.quiet)
    rows = None
    if args.split is not None:
        rows = cache.index.loc[cache.index["split"] == args.split, "cache_row"].to_numpy()
        if len(rows) == 0:
            raise CxrtuneError(f"--split {args.split}: the {args.source} cache has no image in that split")
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
