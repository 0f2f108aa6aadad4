"""``cxrtune pretrain``: one pretraining run in this process, with a progress bar.

    cxrtune pretrain --method moco --source phantom --profile cpu --out runs/moco-cpu
    cxrtune pretrain --method barlow --source nih --root /data/nih --profile study --out runs/bt \\
        --set optim.lr=1e-3 --set train.epochs=50

The source's uint8 cache is built on first use (``cxrtune data cache``) and reused after. The run
folder receives ``checkpoints/epoch-NNNN.pt``, ``metrics.jsonl`` and ``config.json``; running the
same command again resumes from the latest checkpoint.

Profiles are the sweeps' (:mod:`cxrtune.profiles`): ``--profile cpu`` trains what a ``--profile cpu``
sweep trial trains, on the same cache side and (for the phantom) the same phantom options.
``--profile smoke`` is a plumbing check: 32 px images, two epochs, one torch thread and, on the
phantom source, a 502-image phantom (``-o KEY=VALUE`` overrides any of it); it finishes in under
a minute on 2 cores (docs/performance.md). Its losses and checkpoints mean nothing.
``--print-config`` prints the config with where every value comes from, and exits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrtune.errors import ConfigError, CxrtuneError
from cxrtune.methods import method_names
from cxrtune.profiles import PROFILES, profile_notes

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
    p = subparsers.add_parser("pretrain", help=f"run one SSL pretraining ({', '.join(method_names())})",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Profiles:\n" + profile_notes())
    p.add_argument("--method", required=True, choices=method_names())
    p.add_argument("--profile", default="study", choices=tuple(PROFILES), help="budget and scale (default: study)")
    p.add_argument("--source", default="phantom", help="data source: phantom, nih, padchest or csv")
    p.add_argument("--root", default=None, help="folder of the source's files (not needed for phantom)")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE",
                   help="source option, repeatable (with --profile smoke they override the small phantom)")
    p.add_argument("--size", type=int, default=None,
                   help="side of the cached images, 8 to 4096 px (default: the profile's: 256 for study and l4, "
                        "64 for cpu and default, 32 for smoke)")
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
    p.add_argument("--print-config", action="store_true",
                   help="print the config with where each value comes from (default, method preset, profile, "
                        "--set) and exit")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch, >= 1 (default: 1 for smoke, else torch's choice; "
                        "use 1 on a loaded machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_pretrain)
    return p


def resolve_config(args: argparse.Namespace):
    """The run's resolved config (:func:`cxrtune.resolve.resolve_pretrain`); shortcuts are ``--set`` keys."""
    from cxrtune.cli import parse_options
    from cxrtune.resolve import resolve_pretrain

    overrides = parse_options(args.overrides, "--set")
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.device is not None:
        overrides["train.device"] = args.device
    if args.init is not None:
        overrides["model.init"] = args.init
    if args.weights is not None:
        overrides["model.weights"] = args.weights
    trial_only = [k for k in overrides if k.split(".", 1)[0] in ("probe", "health", "trial")]
    if trial_only:
        raise ConfigError(f"--set {trial_only[0]}: probe.*, health.* and trial.* configure a sweep trial, not "
                          "cxrtune pretrain; set it on a sweep's command line")
    return resolve_pretrain(args.profile, args.method, sets=overrides).engine_only()


def source_options(args: argparse.Namespace) -> dict:
    """``-o`` options, on top of the profile's phantom options for ``--source phantom``."""
    from cxrtune.cli import parse_options

    options = parse_options(args.option)
    if args.source == "phantom":
        options = {**PROFILES[args.profile].phantom, **options}
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
    resolved = resolve_config(args)
    if args.print_config:
        print(resolved.table(f"cxrtune pretrain --method {args.method} --profile {args.profile}"))
        return 0
    config = resolved.pretrain
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
    size = args.size if args.size is not None else PROFILES[args.profile].cache_size
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
